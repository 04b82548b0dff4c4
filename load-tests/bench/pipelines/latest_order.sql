SELECT o_custkey, o_orderkey, o_orderdate, o_totalprice
FROM (
    SELECT o_custkey, o_orderkey, o_orderdate, o_totalprice,
           ROW_NUMBER() OVER (PARTITION BY o_custkey ORDER BY o_orderdate DESC, o_orderkey DESC) AS rn
    FROM orders
) ranked
WHERE rn = 1
