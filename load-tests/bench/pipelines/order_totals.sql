SELECT l_orderkey,
       COUNT(*) AS line_items,
       SUM(l_quantity) AS quantity,
       SUM(l_extendedprice) AS gross
FROM lineitem
GROUP BY l_orderkey
