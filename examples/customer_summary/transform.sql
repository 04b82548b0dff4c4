-- One row per customer with orders: lifetime counts and spend, and the latest order
-- (a window function picks it; ties go to the larger order key).
WITH ranked AS (
    SELECT
        o.o_custkey,
        o.o_orderkey,
        o.o_orderdate,
        o.o_totalprice,
        COUNT(*) OVER (PARTITION BY o.o_custkey)           AS orders,
        SUM(o.o_totalprice) OVER (PARTITION BY o.o_custkey) AS lifetime_spend,
        ROW_NUMBER() OVER (
            PARTITION BY o.o_custkey
            ORDER BY o.o_orderdate DESC, o.o_orderkey DESC
        )                                                   AS recency
    FROM orders o
)
SELECT
    c.c_custkey        AS customer_key,
    c.c_name           AS customer_name,
    c.c_mktsegment     AS segment,
    r.orders           AS orders,
    r.lifetime_spend   AS lifetime_spend,
    r.o_orderkey       AS latest_order_key,
    r.o_orderdate      AS latest_order_date,
    r.o_totalprice     AS latest_order_total
FROM ranked r
JOIN customer c ON c.c_custkey = r.o_custkey
WHERE r.recency = 1
