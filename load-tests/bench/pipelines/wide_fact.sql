SELECT l_orderkey, l_linenumber, o_orderdate, o_custkey, o_orderpriority,
       p_partkey, p_name, p_brand, p_type,
       s_suppkey, s_name, s_nationkey,
       l_quantity, l_extendedprice, l_shipdate
FROM lineitem
JOIN orders ON l_orderkey = o_orderkey
JOIN part ON l_partkey = p_partkey
JOIN supplier ON l_suppkey = s_suppkey
