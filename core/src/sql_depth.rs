//! How deep a spec's SQL nests its expressions, refused past a bound before DataFusion sees it.
//!
//! DataFusion names, displays and rewrites expressions recursively, some of it outside its
//! stack guard: a chain of a few thousand operators (`a + a + ... + a`, `x = 1 OR x = 2 OR
//! ...`) overflowed the stack and aborted the whole process (a coordinator, for one
//! submitted job, and again after each restart, as the job was redelivered). Function
//! calls, parentheses and `CASE` already meet sqlparser's recursion limit; only binary
//! operators, which it parses in a loop, build trees of any depth. So the bound counts them
//! from the tokens, before any parsing or planning.

use datafusion::sql::sqlparser::dialect::GenericDialect;
use datafusion::sql::sqlparser::keywords::Keyword;
use datafusion::sql::sqlparser::tokenizer::{Token, Tokenizer};

use crate::error::{CoreError, Result};

/// The deepest expression a spec's SQL may hold, in binary operators.
pub const MAX_EXPRESSION_DEPTH: usize = 1000;

/// Refuses `sql` whose expressions nest deeper than [`MAX_EXPRESSION_DEPTH`] operators.
pub fn check_expression_depth(sql: &str) -> Result<()> {
    let depth = expression_depth(sql);
    if depth > MAX_EXPRESSION_DEPTH {
        return Err(CoreError::Sql(format!(
            "an expression of the SQL chains {depth} operators (+, -, AND, OR, =, ...); at most {MAX_EXPRESSION_DEPTH} are supported: split it (IN (...) for a list of values, several columns or steps)"
        )));
    }
    Ok(())
}

/// An upper bound of the depth of `sql`'s expression trees in binary operators. Between
/// separators (a comma, a clause keyword) the operators of one level form a chain, as deep
/// as it is long; a parenthesized part adds its own depth to the chain it is in. SQL the
/// tokenizer cannot read counts 0 (the planner reports its error).
pub fn expression_depth(sql: &str) -> usize {
    let Ok(tokens) = Tokenizer::new(&GenericDialect {}, sql).tokenize() else {
        return 0;
    };
    let mut levels = vec![Level::default()];
    for token in &tokens {
        let level = levels.last_mut().expect("the statement's level");
        if is_binary_operator(token) {
            level.chain += 1;
        } else if ends_an_expression(token) {
            level.end_chain();
        } else if *token == Token::LParen {
            levels.push(Level::default());
        } else if *token == Token::RParen && levels.len() > 1 {
            let inner = levels.pop().expect("an inner level").deepest();
            let outer = levels.last_mut().expect("the statement's level");
            outer.deepest_inside = outer.deepest_inside.max(inner);
        }
    }
    levels.iter().map(Level::deepest).max().unwrap_or(0)
}

/// One level of parentheses while the tokens are read.
#[derive(Debug, Default)]
struct Level {
    /// Operators of the current chain.
    chain: usize,
    /// The deepest parenthesized part inside the current chain.
    deepest_inside: usize,
    /// The deepest of the chains this level has ended.
    deepest_ended: usize,
}

impl Level {
    fn end_chain(&mut self) {
        self.deepest_ended = self.deepest();
        self.chain = 0;
        self.deepest_inside = 0;
    }

    fn deepest(&self) -> usize {
        self.deepest_ended.max(self.chain + self.deepest_inside)
    }
}

fn is_binary_operator(token: &Token) -> bool {
    match token {
        Token::Plus
        | Token::Minus
        | Token::Mul
        | Token::Div
        | Token::Mod
        | Token::DuckIntDiv
        | Token::StringConcat
        | Token::Eq
        | Token::DoubleEq
        | Token::Neq
        | Token::Lt
        | Token::Gt
        | Token::LtEq
        | Token::GtEq
        | Token::Spaceship
        | Token::Caret
        | Token::Ampersand
        | Token::Pipe
        | Token::ShiftLeft
        | Token::ShiftRight => true,
        Token::Word(word) => matches!(
            word.keyword,
            Keyword::AND
                | Keyword::OR
                | Keyword::XOR
                | Keyword::LIKE
                | Keyword::ILIKE
                | Keyword::IS
        ),
        _ => false,
    }
}

fn ends_an_expression(token: &Token) -> bool {
    match token {
        Token::Comma | Token::SemiColon => true,
        Token::Word(word) => matches!(
            word.keyword,
            Keyword::SELECT
                | Keyword::FROM
                | Keyword::WHERE
                | Keyword::GROUP
                | Keyword::HAVING
                | Keyword::ORDER
                | Keyword::LIMIT
                | Keyword::ON
                | Keyword::JOIN
                | Keyword::UNION
                | Keyword::CASE
                | Keyword::WHEN
                | Keyword::THEN
                | Keyword::ELSE
                | Keyword::END
                | Keyword::AS
        ),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(op: &str, n: usize) -> String {
        vec!["a"; n + 1].join(op)
    }

    #[test]
    fn depth_counts_operators_along_open_parentheses() {
        assert_eq!(expression_depth("SELECT a FROM t"), 0);
        assert_eq!(expression_depth("SELECT a + b, c * d - e FROM t"), 2);
        assert_eq!(expression_depth("SELECT (a + (b + c) + d) + e FROM t"), 4);
        assert_eq!(
            expression_depth("SELECT f(a + b, c + d) FROM t WHERE x = 1 AND y = 2"),
            3
        );
        assert_eq!(
            expression_depth("SELECT CASE WHEN a = 1 THEN b + c ELSE d END FROM t"),
            1
        );
        assert_eq!(
            expression_depth(&format!("SELECT {} FROM t", chain(" OR ", 1500))),
            1500
        );
        let in_list = vec!["1"; 5000].join(", ");
        assert_eq!(
            expression_depth(&format!("SELECT a FROM t WHERE a IN ({in_list})")),
            0
        );
        assert_eq!(expression_depth("SELECT 'unterminated"), 0);
    }

    #[test]
    fn a_chain_past_the_bound_is_refused_by_name_and_one_at_it_is_not() {
        let at = format!("SELECT {} FROM t", chain("+", MAX_EXPRESSION_DEPTH));
        assert!(check_expression_depth(&at).is_ok());
        let past = format!("SELECT {} FROM t", chain("+", MAX_EXPRESSION_DEPTH + 1));
        let err = check_expression_depth(&past).unwrap_err().to_string();
        assert!(err.contains("chains 1001 operators"), "{err}");
        assert!(err.contains("at most 1000"), "{err}");
        let nested = format!(
            "SELECT ({}) + ({}) FROM t",
            chain("+", 600),
            chain("+", 600)
        );
        assert!(
            check_expression_depth(&nested).is_ok(),
            "siblings do not add up"
        );
        let inside = format!("SELECT {} + ({}) FROM t", chain("+", 600), chain("+", 600));
        assert!(check_expression_depth(&inside).is_err(), "nesting adds up");
    }
}
