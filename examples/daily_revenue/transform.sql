-- Net revenue per order day and customer region for [start_date, end_date).
SELECT
    o.o_orderdate                                   AS order_date,
    r.r_name                                        AS region,
    COUNT(DISTINCT o.o_orderkey)                    AS orders,
    COUNT(*)                                        AS line_items,
    CAST(SUM(l.l_extendedprice * (1 - l.l_discount)) AS DECIMAL(18, 2)) AS net_revenue
FROM orders o
JOIN lineitem l ON l.l_orderkey = o.o_orderkey
JOIN customer c ON c.c_custkey = o.o_custkey
JOIN nation n ON n.n_nationkey = c.c_nationkey
JOIN region r ON r.r_regionkey = n.n_regionkey
WHERE o.o_orderdate >= DATE '${start_date}'
  AND o.o_orderdate < DATE '${end_date}'
GROUP BY o.o_orderdate, r.r_name
