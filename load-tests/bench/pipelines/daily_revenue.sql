SELECT l_shipdate AS ship_day,
       n_name AS nation,
       SUM(l_extendedprice * (1 - l_discount)) AS revenue,
       COUNT(*) AS line_items
FROM lineitem
JOIN orders ON l_orderkey = o_orderkey
JOIN customer ON o_custkey = c_custkey
JOIN nation ON c_nationkey = n_nationkey
GROUP BY l_shipdate, n_name
