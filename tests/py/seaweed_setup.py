"""Creates the buckets a test needs on a SeaweedFS S3 endpoint: a plain bucket (scratch and
the SQL catalog's warehouse) and an S3 Tables bucket (the REST catalog's warehouse).

Usage: seaweed_setup.py ENDPOINT BUCKET TABLE_BUCKET   (credentials from AWS_* env)
"""

import sys

import boto3


def main():
    endpoint, bucket, table_bucket = sys.argv[1:4]
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    s3.create_bucket(Bucket=bucket)
    tables = boto3.client("s3tables", endpoint_url=endpoint, region_name="us-east-1")
    tables.create_table_bucket(name=table_bucket)


if __name__ == "__main__":
    main()
