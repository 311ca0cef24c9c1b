//! Conversion of llama.cpp GBNF grammars into llguidance's Lark-like syntax.
//!
//! Rules whose bodies (transitively) hold only literals, character classes and
//! `.` become uppercase Lark terminals, the others lowercase rules. llguidance
//! compiles a terminal into one regex lexeme; a character loop like `[^"\\]*`
//! left in a rule would run its Earley parser once per character, which its
//! docs warn is slow up to refusing to run. The cost: llguidance lexes
//! terminals greedily, so where a rule puts a terminal before text that the
//! terminal could also match (`pre "end"` with `pre ::= [a-z ]*`), it does not
//! backtrack the way llama.cpp's sampler does. Rules made only of terminals
//! (including `root`) compile to a single regex and match exactly.

use std::collections::{HashMap, HashSet};
use std::fmt;

/// A grammar the converter cannot handle; `line` is 1-based.
#[derive(Debug, Clone, PartialEq)]
pub struct GbnfError {
    pub line: usize,
    pub message: String,
}

impl fmt::Display for GbnfError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "GBNF error on line {}: {}", self.line, self.message)
    }
}

impl std::error::Error for GbnfError {}

fn err(line: usize, message: impl Into<String>) -> GbnfError {
    let message = message.into();
    GbnfError { line, message }
}

/// Repetition bounds `(min, max)`; `max == None` is unbounded.
type Rep = (u32, Option<u32>);
const ONCE: Rep = (1, Some(1));
/// Guards the recursive parser and emitter against stack overflow.
const MAX_NESTING: usize = 100;

#[derive(Debug, Clone, PartialEq)]
enum Atom {
    Lit(String),
    Class(bool, Vec<(char, char)>),
    Any,
    Ref(String, usize),
    Group(Vec<Seq>),
}
type Seq = Vec<(Atom, Rep)>;

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Atom(Atom),
    Define,
    LParen,
    RParen,
    Pipe,
    Rep(Rep),
}

fn is_name_char(c: &char) -> bool {
    c.is_ascii_alphanumeric() || *c == '-' || *c == '_'
}

fn tokenize(src: &str) -> Result<Vec<(Tok, usize)>, GbnfError> {
    let chars: Vec<char> = src.chars().collect();
    let (mut i, mut line, mut out) = (0, 1, Vec::new());
    while let Some(&c) = chars.get(i) {
        let start_line = line;
        i += 1;
        let tok = match c {
            '\n' => {
                line += 1;
                continue;
            }
            '#' => {
                while chars.get(i).is_some_and(|&c| c != '\n') {
                    i += 1;
                }
                continue;
            }
            c if c.is_whitespace() => continue,
            '|' => Tok::Pipe,
            '(' => Tok::LParen,
            ')' => Tok::RParen,
            '.' => Tok::Atom(Atom::Any),
            '*' => Tok::Rep((0, None)),
            '+' => Tok::Rep((1, None)),
            '?' => Tok::Rep((0, Some(1))),
            ':' if chars.get(i..i + 2) == Some(&[':', '='][..]) => {
                i += 2;
                Tok::Define
            }
            '"' => {
                let mut s = String::new();
                while chars.get(i) != Some(&'"') {
                    if i >= chars.len() {
                        return Err(err(start_line, "unterminated string literal"));
                    }
                    s.push(read_char(&chars, &mut i, &mut line)?);
                }
                i += 1;
                Tok::Atom(Atom::Lit(s))
            }
            '[' => {
                let negated = chars.get(i) == Some(&'^');
                i += usize::from(negated);
                let mut ranges = Vec::new();
                while chars.get(i) != Some(&']') {
                    if i >= chars.len() {
                        return Err(err(start_line, "unterminated character class"));
                    }
                    let lo = read_char(&chars, &mut i, &mut line)?;
                    let mut hi = lo;
                    // A '-' right before ']' is a literal dash, not a range.
                    if chars.get(i) == Some(&'-') && chars.get(i + 1).is_some_and(|&c| c != ']') {
                        i += 1;
                        hi = read_char(&chars, &mut i, &mut line)?;
                        if hi < lo {
                            return Err(err(line, format!("invalid range '{lo}-{hi}'")));
                        }
                    }
                    ranges.push((lo, hi));
                }
                i += 1;
                if ranges.is_empty() && !negated {
                    return Err(err(start_line, "empty character class"));
                }
                Tok::Atom(Atom::Class(negated, ranges))
            }
            '{' => {
                let len = chars[i..].iter().position(|&c| c == '}');
                let body: String = chars[i..i + len.unwrap_or(0)].iter().collect();
                let rep = len.and_then(|_| parse_bounds(&body));
                let msg = "invalid repetition: expected {m}, {m,} or {m,n} with m <= n";
                i += body.chars().count() + 1;
                line += body.matches('\n').count();
                Tok::Rep(rep.ok_or_else(|| err(start_line, msg))?)
            }
            '<' => return Err(err(line, "token references (<...>) are not supported")),
            c if is_name_char(&c) => {
                let start = i - 1;
                while chars.get(i).is_some_and(is_name_char) {
                    i += 1;
                }
                Tok::Atom(Atom::Ref(chars[start..i].iter().collect(), line))
            }
            c => return Err(err(line, format!("unexpected character {c:?}"))),
        };
        out.push((tok, start_line));
    }
    Ok(out)
}

fn parse_bounds(body: &str) -> Option<Rep> {
    let num = |s: &str| s.trim().parse::<u32>().ok();
    let (min, max) = match body.split_once(',') {
        None => (num(body)?, num(body)),
        Some((a, b)) if b.trim().is_empty() => (num(a)?, None),
        Some((a, b)) => (num(a)?, Some(num(b)?)),
    };
    max.is_none_or(|max| min <= max).then_some((min, max))
}

/// Reads one possibly escaped character of a string literal or class.
fn read_char(chars: &[char], i: &mut usize, line: &mut usize) -> Result<char, GbnfError> {
    let c = chars.get(*i).copied().unwrap_or_default();
    *i += 1;
    *line += usize::from(c == '\n');
    if c != '\\' {
        return Ok(c);
    }
    let Some(&e) = chars.get(*i) else {
        return Err(err(*line, "unterminated escape sequence"));
    };
    *i += 1;
    let digits = match e {
        'n' => return Ok('\n'),
        'r' => return Ok('\r'),
        't' => return Ok('\t'),
        '\\' | '"' | '[' | ']' => return Ok(e),
        'x' => 2,
        'u' => 4,
        'U' => 8,
        _ => return Err(err(*line, format!("unknown escape sequence '\\{e}'"))),
    };
    let hex: String = chars.iter().skip(*i).take(digits).collect();
    *i += digits;
    let code = (hex.len() == digits && hex.chars().all(|c| c.is_ascii_hexdigit()))
        .then(|| u32::from_str_radix(&hex, 16).ok().and_then(char::from_u32));
    let msg = format!("invalid escape '\\{e}{hex}': need {digits} hex digits of a code point");
    code.flatten().ok_or_else(|| err(*line, msg))
}

struct Parser {
    toks: Vec<(Tok, usize)>,
    pos: usize,
}

impl Parser {
    fn peek(&self, ahead: usize) -> Option<&Tok> {
        self.toks.get(self.pos + ahead).map(|(t, _)| t)
    }

    // Newlines are insignificant: a rule ends where the next `name ::=` starts.
    fn at_rule_start(&self) -> bool {
        matches!(self.peek(0), Some(Tok::Atom(Atom::Ref(..)))) && self.peek(1) == Some(&Tok::Define)
    }

    fn rules(&mut self) -> Result<Vec<(String, usize, Vec<Seq>)>, GbnfError> {
        let mut rules = Vec::new();
        while let Some((tok, line)) = self.toks.get(self.pos).cloned() {
            match tok {
                Tok::Atom(Atom::Ref(name, _)) if self.at_rule_start() => {
                    self.pos += 2;
                    rules.push((name, line, self.alts(0)?));
                }
                Tok::Atom(Atom::Ref(name, _)) => {
                    return Err(err(
                        line,
                        format!("expected '::=' after rule name '{name}'"),
                    ))
                }
                Tok::RParen => return Err(err(line, "unbalanced parentheses: unexpected ')'")),
                _ => return Err(err(line, "expected a rule definition 'name ::= ...'")),
            }
        }
        Ok(rules)
    }

    fn alts(&mut self, depth: usize) -> Result<Vec<Seq>, GbnfError> {
        let mut alts = vec![self.seq(depth)?];
        while self.peek(0) == Some(&Tok::Pipe) {
            self.pos += 1;
            alts.push(self.seq(depth)?);
        }
        Ok(alts)
    }

    fn seq(&mut self, depth: usize) -> Result<Seq, GbnfError> {
        let mut seq: Seq = Vec::new();
        while !self.at_rule_start() {
            let Some((tok, line)) = self.toks.get(self.pos).cloned() else {
                break;
            };
            let atom = match tok {
                Tok::Pipe | Tok::RParen => break,
                Tok::Define => return Err(err(line, "unexpected '::='")),
                Tok::Atom(atom) => atom,
                Tok::Rep(rep) => {
                    self.pos += 1;
                    match seq.last_mut() {
                        Some((_, last)) if *last == ONCE => *last = rep,
                        Some(_) => return Err(err(line, "stacked repetition; use parentheses")),
                        None => return Err(err(line, "repetition with nothing to repeat")),
                    }
                    continue;
                }
                Tok::LParen if depth >= MAX_NESTING => {
                    return Err(err(line, "parentheses nested too deeply"))
                }
                Tok::LParen => {
                    self.pos += 1;
                    let alts = self.alts(depth + 1)?;
                    if self.peek(0) != Some(&Tok::RParen) {
                        return Err(err(line, "unbalanced parentheses: '(' is never closed"));
                    }
                    Atom::Group(alts)
                }
            };
            self.pos += 1;
            seq.push((atom, ONCE));
        }
        Ok(seq)
    }
}

/// Checks that referenced rules exist and collects their indices.
fn collect_refs(alts: &[Seq], index: &HashMap<&str, usize>) -> Result<Vec<usize>, GbnfError> {
    let mut deps = Vec::new();
    for (atom, _) in alts.iter().flatten() {
        match atom {
            Atom::Ref(name, line) => deps.push(
                *index
                    .get(name.as_str())
                    .ok_or_else(|| err(*line, format!("undefined rule '{name}'")))?,
            ),
            Atom::Group(inner) => deps.extend(collect_refs(inner, index)?),
            _ => {}
        }
    }
    Ok(deps)
}

/// Converts a GBNF grammar (llama.cpp's grammar format) to llguidance's Lark syntax.
pub fn gbnf_to_lark(gbnf: &str) -> Result<String, GbnfError> {
    let toks = tokenize(gbnf)?;
    let rules = Parser { toks, pos: 0 }.rules()?;
    let mut index = HashMap::new();
    for (i, (name, line, _)) in rules.iter().enumerate() {
        if index.insert(name.as_str(), i).is_some() {
            return Err(err(
                *line,
                format!("rule '{name}' is defined more than once"),
            ));
        }
    }
    let root = *index
        .get("root")
        .ok_or_else(|| err(1, "grammar has no 'root' rule"))?;
    let deps = rules
        .iter()
        .map(|r| collect_refs(&r.2, &index))
        .collect::<Result<Vec<_>, _>>()?;
    // A rule is a terminal once everything it references is; recursive ones never are.
    let mut terminal = vec![false; rules.len()];
    let mut changed = true;
    while changed {
        changed = false;
        for i in 0..rules.len() {
            if !terminal[i] && deps[i].iter().all(|&d| terminal[d]) {
                (terminal[i], changed) = (true, true);
            }
        }
    }
    // Lark names need a leading letter, no dashes, and case marks rule vs terminal.
    let mut used = HashSet::from(["start".to_string()]);
    let mut names = Vec::new();
    for (i, (gbnf_name, ..)) in rules.iter().enumerate() {
        let mut name = "start".to_string();
        if i != root {
            let mut base = gbnf_name.to_ascii_lowercase().replace('-', "_");
            if !base.starts_with(|c: char| c.is_ascii_lowercase()) {
                base = format!("r_{base}");
            }
            name.clone_from(&base);
            for n in 2.. {
                if used.insert(name.clone()) {
                    break;
                }
                name = format!("{base}_{n}");
            }
        }
        if terminal[i] {
            name.make_ascii_uppercase();
        }
        names.push(name);
    }
    let name_of = |name: &str| index.get(name).map_or("", |&i| names[i].as_str());
    let mut out = String::new();
    if terminal[root] {
        out += "start: START\n";
    }
    for ((_, _, alts), name) in rules.iter().zip(&names) {
        out += &format!("{name}: {}\n", emit(alts, &name_of));
    }
    Ok(out)
}

fn emit<'a>(alts: &[Seq], name_of: &impl Fn(&str) -> &'a str) -> String {
    let item = |(atom, rep): &(Atom, Rep)| {
        let body = match atom {
            // llguidance rejects `{0}`; zero repetitions is just the empty string.
            _ if rep.1 == Some(0) => return "\"\"".to_string(),
            Atom::Lit(s) => literal(s),
            Atom::Class(negated, ranges) => class(*negated, ranges),
            Atom::Any => "/(?s:.)/".to_string(),
            Atom::Ref(name, _) => name_of(name).to_string(),
            Atom::Group(inner) => format!("({})", emit(inner, name_of)),
        };
        match *rep {
            ONCE => body,
            (0, None) => body + "*",
            (1, None) => body + "+",
            (0, Some(1)) => body + "?",
            (m, None) => format!("{body}{{{m},}}"),
            (m, Some(n)) if m == n => format!("{body}{{{m}}}"),
            (m, Some(n)) => format!("{body}{{{m},{n}}}"),
        }
    };
    let seq = |seq: &Seq| {
        if seq.is_empty() {
            return "\"\"".to_string();
        }
        seq.iter().map(item).collect::<Vec<_>>().join(" ")
    };
    alts.iter().map(seq).collect::<Vec<_>>().join(" | ")
}

/// Lark string literals use JSON string syntax.
fn literal(s: &str) -> String {
    let mut out = String::from('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_ascii_control() => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out + "\""
}

fn class(negated: bool, ranges: &[(char, char)]) -> String {
    if negated && ranges.is_empty() {
        return "/(?s:.)/".to_string();
    }
    // Hex-escape all but alphanumerics so neither regex class syntax
    // (`]`, `^`, `-`, `&&`, ...) nor Lark's `/` delimiter can interfere.
    let esc = |c: char| {
        if c.is_ascii_alphanumeric() {
            return c.to_string();
        }
        format!("\\x{{{:X}}}", c as u32)
    };
    let mut out = String::from(if negated { "/[^" } else { "/[" });
    for &(lo, hi) in ranges {
        out += &esc(lo);
        if hi != lo {
            out += &format!("-{}", esc(hi));
        }
    }
    out + "]/"
}

#[cfg(test)]
mod tests {
    use super::*;
    use llguidance::{api::TopLevelGrammar, Matcher, ParserFactory};

    const JSON: &str = r#"
root   ::= object
value  ::= object | array | string | number | ("true" | "false" | "null") ws

object ::=
  "{" ws (
            string ":" ws value
    ("," ws string ":" ws value)*
  )? "}" ws

array  ::=
  "[" ws (
            value
    ("," ws value)*
  )? "]" ws

string ::=
  "\"" (
    [^"\\\x7F\x00-\x1F] |
    "\\" (["\\bfnrt] | "u" [0-9a-fA-F]{4}) # escapes
  )* "\"" ws

number ::= ("-"? ([0-9] | [1-9] [0-9]{0,15})) ("." [0-9]+)? ([eE] [-+]? [0-9] [1-9]{0,15})? ws

# Optional space: by convention, applied in this grammar after literal chars when allowed
ws ::= | " " | "\n" [ \t]{0,20}
"#;

    /// Compiles `lark` with a byte-level vocabulary (token id == byte value) and
    /// reports whether the grammar accepts exactly `input`.
    fn accepts(lark: &str, input: &str) -> bool {
        let env = toktrie::ApproximateTokEnv::single_byte_env();
        let factory = ParserFactory::new_simple(&env).expect("factory");
        let parser = factory.create_parser(TopLevelGrammar::from_lark(lark.to_string()));
        let mut m = Matcher::new(parser);
        assert!(
            !m.is_error(),
            "llguidance rejected grammar: {:?}\n{lark}",
            m.get_error()
        );
        input.bytes().all(|b| m.consume_token(u32::from(b)).is_ok())
            && m.is_accepting().unwrap_or(false)
    }

    fn check(gbnf: &str, good: &[&str], bad: &[&str]) -> String {
        let lark = gbnf_to_lark(gbnf).expect("conversion");
        for s in good {
            assert!(accepts(&lark, s), "should accept {s:?}\n{lark}");
        }
        for s in bad {
            assert!(!accepts(&lark, s), "should reject {s:?}\n{lark}");
        }
        lark
    }

    fn error_of(gbnf: &str) -> GbnfError {
        gbnf_to_lark(gbnf).expect_err("should fail")
    }

    #[test]
    fn choice() {
        let lark = check(
            r#"root ::= "yes" | "no""#,
            &["yes", "no"],
            &["ye", "yesno", "maybe", ""],
        );
        assert_eq!(lark, "start: START\nSTART: \"yes\" | \"no\"\n");
    }

    #[test]
    fn list_grammar() {
        let gbnf = r#"
root ::= "[" item ("," ws item)* "]"
item ::= [a-z]+ | list
list ::= "(" item+ ")"
ws ::= [ ]?
"#;
        let lark = check(
            gbnf,
            &["[a]", "[ab, c,d]", "[(ab),x]"],
            &["[]", "[a,]", "[A]", "[a"],
        );
        assert!(
            lark.contains("start: \"[\" item (\",\" WS item)* \"]\"\n"),
            "{lark}"
        );
        assert!(lark.contains("item: /[a-z]/+ | list\n"), "{lark}");
        assert!(lark.contains("WS: /[\\x{20}]/?\n"), "{lark}");
    }

    #[test]
    fn json_grammar() {
        let good = [
            r#"{}"#,
            r#"{"a": [1, 2.5, -3e4, "x\n\u00e9"], "b": {"c": true, "d": null}}"#,
            "{\n  \"k\": [ ]\n}",
        ];
        let bad = [
            r#"{"a": tru}"#,
            r#"{a: 1}"#,
            r#"{"a": 01x}"#,
            r#"{"a": "b"#,
            "[1]",
        ];
        let lark = check(JSON, &good, &bad);
        assert!(
            lark.contains("WS: \"\" | \" \" | \"\\n\" /[\\x{20}\\x{9}]/{0,20}\n"),
            "{lark}"
        );
        assert!(
            lark.contains(
                "value: object | array | STRING | NUMBER | (\"true\" | \"false\" | \"null\") WS\n"
            ),
            "{lark}"
        );
    }

    #[test]
    fn char_classes_and_escapes() {
        let gbnf = r#"root ::= [\x41-\x43\]\\/\n^-]+ "\"\t\u00e9\U0001F600" [^a-z] . "/""#;
        let lark = check(
            gbnf,
            &["A]\\/\n^-\"\té😀Z\n/", "C\"\té😀\u{1}é/"],
            &["a\"\té😀ZZ/", "D\"\té😀ZZ/", "A\"\té😀aZ/"],
        );
        assert!(
            lark.contains(
                r#"/[A-C\x{5D}\x{5C}\x{2F}\x{A}\x{5E}\x{2D}]/+ "\"\té😀" /[^a-z]/ /(?s:.)/ "/""#
            ),
            "{lark}"
        );
    }

    #[test]
    fn repetition_bounds() {
        let gbnf = "root ::= \"ab\"{2} [0-9]{1,3} \"x\"{2,} (\"-\" | \"+\"){ 0 , 1 } \"c\"{0}";
        let lark = check(
            gbnf,
            &["abab1xx", "abab123xxxx-", "abab7xx+"],
            &["ab1xx", "abab1234xx", "abab1x", "abab1xx-+"],
        );
        assert!(
            lark.contains("\"ab\"{2} /[0-9]/{1,3} \"x\"{2,} (\"-\" | \"+\")? \"\"\n"),
            "{lark}"
        );
    }

    #[test]
    fn names_comments_and_continuation_lines() {
        let gbnf = r#"# leading comment with "quote" and [bracket
root ::= Foo-bar foo_bar
    | start 1x  # trailing
Foo-bar ::= "a" root?
foo_bar ::= "b"
start ::= "c"
1x ::= "d"
"#;
        let lark = check(gbnf, &["ab", "aabb", "cd", "acdb"], &["a", "ba", "c"]);
        assert_eq!(
            lark,
            r#"start: foo_bar FOO_BAR_2 | START_2 R_1X
foo_bar: "a" start?
FOO_BAR_2: "b"
START_2: "c"
R_1X: "d"
"#
        );
    }

    #[test]
    fn empty_alternatives_and_recursion() {
        check(
            "root ::= \"(\" root \")\" | ",
            &["", "()", "(())"],
            &["(", "())"],
        );
        check(
            "root ::= a\na ::= \"x\" | ( | \"y\" )\n",
            &["x", "", "y"],
            &["xy"],
        );
    }

    #[test]
    fn errors_carry_line_numbers() {
        let cases = [
            ("root ::= \"a\"\nfoo ::= bar\n", 2, "undefined rule 'bar'"),
            ("rot ::= \"a\"\n", 1, "no 'root' rule"),
            ("", 1, "no 'root' rule"),
            ("root ::= \"a\"\nx ::= \"abc\n\n", 2, "unterminated string"),
            (
                "root ::= \"a\"\n\nx ::= [abc\n",
                3,
                "unterminated character class",
            ),
            ("root ::= \"a\\q\"", 1, "unknown escape sequence '\\q'"),
            ("root ::=\n \"\\x4\"", 2, "invalid escape '\\x4\"'"),
            ("root ::= [\\uD800]", 1, "invalid escape"),
            ("root ::= (\"a\"\nx ::= \"b\"", 1, "'(' is never closed"),
            ("root ::= \"a\"\n  \"b\")", 2, "unexpected ')'"),
            ("root ::= \"a\"\nx ::= <[1234]>", 2, "token references"),
            ("root ::= <think>", 1, "token references"),
            (
                "root ::= \"a\"\nroot ::= \"b\"",
                2,
                "defined more than once",
            ),
            ("root ::= * \"a\"", 1, "nothing to repeat"),
            ("root ::= \"a\"{3,1}", 1, "invalid repetition"),
            ("root ::= \"a\"\nx := \"b\"", 2, "unexpected character ':'"),
            ("\nx \"a\"", 2, "expected '::=' after rule name 'x'"),
            ("root ::= \"a\"**", 1, "stacked repetition"),
            ("root ::= \"a\"\n  [z-a]", 2, "invalid range 'z-a'"),
        ];
        for (gbnf, line, msg) in cases {
            let e = error_of(gbnf);
            assert_eq!(e.line, line, "{gbnf:?} -> {e}");
            assert!(e.message.contains(msg), "{gbnf:?} -> {e}");
        }
        let deep = format!("root ::= {}", "(".repeat(10_000));
        assert!(error_of(&deep).message.contains("nested too deeply"));
    }

    #[test]
    fn never_panics_on_truncated_input() {
        for src in [JSON, r#"root ::= [\x41-\x43\]\\] "\u00e9" ("a"{2,3} | .)*"#] {
            for (i, _) in src.char_indices() {
                let _ = gbnf_to_lark(&src[..i]);
            }
        }
    }
}
