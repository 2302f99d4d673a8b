//! etcdctl's txn input: compares, a blank line, success ops, a blank line, failure ops.
//! Compare lines look like `mod("k1") > "0"` or `value("k1") = "v"`; op lines are
//! `put KEY VALUE`, `get KEY [flags]`, `del KEY [flags]` with Go-style quoting.

use super::{del_request, get_request, put_request, DelArgs, GetArgs, PutArgs};
use crate::error::KvError;
use crate::model::*;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(no_binary_name = true)]
struct OpLine {
    #[command(subcommand)]
    op: Op,
}

#[derive(Subcommand)]
enum Op {
    Put(PutArgs),
    Get(GetArgs),
    Del(DelArgs),
}

fn err(msg: String) -> KvError {
    KvError::Client(msg)
}

/// Splits a line into words; "double-quoted" words use Go escapes (\" \\ \n \t).
pub fn argify(line: &str) -> Result<Vec<String>, KvError> {
    let mut out = Vec::new();
    let mut chars = line.chars().peekable();
    while let Some(&c) = chars.peek() {
        if c.is_whitespace() {
            chars.next();
            continue;
        }
        let mut word = String::new();
        if c == '"' {
            chars.next();
            let mut closed = false;
            while let Some(c) = chars.next() {
                match c {
                    '"' => {
                        closed = true;
                        break;
                    }
                    '\\' => match chars.next() {
                        Some('n') => word.push('\n'),
                        Some('t') => word.push('\t'),
                        Some('r') => word.push('\r'),
                        Some('0') => word.push('\0'),
                        Some(o) => word.push(o),
                        None => return Err(err(format!("unterminated quote in {line:?}"))),
                    },
                    o => word.push(o),
                }
            }
            if !closed {
                return Err(err(format!("unterminated quote in {line:?}")));
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c.is_whitespace() {
                    break;
                }
                word.push(c);
                chars.next();
            }
        }
        out.push(word);
    }
    Ok(out)
}

fn parse_compare(line: &str) -> Result<Compare, KvError> {
    let malformed = || err(format!("malformed comparison: {line}"));
    let (target, rest) = line.split_once('(').ok_or_else(malformed)?;
    let close = rest.rfind(')').ok_or_else(malformed)?;
    let keys = argify(&rest[..close])?;
    let tail = argify(&rest[close + 1..])?;
    let (key, range_end) = match keys.as_slice() {
        [k] => (k.clone(), String::new()),
        [k, e] => (k.clone(), e.clone()),
        _ => return Err(malformed()),
    };
    let [op, val] = tail.as_slice() else {
        return Err(malformed());
    };
    let result = match op.as_str() {
        "=" | "==" => CompareResult::Equal,
        "!=" => CompareResult::NotEqual,
        "<" => CompareResult::Less,
        ">" => CompareResult::Greater,
        _ => {
            return Err(err(format!(
                "malformed comparison: {line} (unknown op {op})"
            )))
        }
    };
    let num = || {
        val.parse::<i64>()
            .map_err(|e| err(format!("malformed comparison: {line} ({e})")))
    };
    let target = match target.trim() {
        "ver" | "version" => CompareTarget::Version(num()?),
        "c" | "create" => CompareTarget::Create(num()?),
        "m" | "mod" => CompareTarget::Mod(num()?),
        "val" | "value" => CompareTarget::Value(val.as_bytes().to_vec()),
        "lease" => CompareTarget::Lease(i64::from_str_radix(val, 16).or_else(|_| num())?),
        other => {
            return Err(err(format!(
                "malformed comparison: {line} (unknown target {other})"
            )))
        }
    };
    Ok(Compare {
        key: key.into_bytes(),
        range_end: range_end.into_bytes(),
        target,
        result,
    })
}

fn parse_op(line: &str) -> Result<RequestOp, KvError> {
    let words = argify(line)?;
    let parsed = OpLine::try_parse_from(words)
        .map_err(|e| err(format!("invalid txn request op {line:?}: {}", e.kind())))?;
    Ok(match parsed.op {
        Op::Put(a) => {
            if a.value.is_none() && !a.ignore_value {
                return Err(err(format!(
                    "invalid txn request op {line:?}: put needs a value"
                )));
            }
            RequestOp::Put(put_request(&a)?)
        }
        Op::Get(a) => RequestOp::Range(get_request(&a)?),
        Op::Del(a) => RequestOp::DeleteRange(del_request(&a)?),
    })
}

/// Parses a whole non-interactive txn from standard input's text.
pub fn parse(input: &str) -> Result<TxnRequest, KvError> {
    let mut sections: [Vec<&str>; 3] = Default::default();
    let mut i = 0;
    for line in input.lines() {
        let line = line.trim();
        if line.is_empty() {
            i += 1;
            if i == 3 {
                break;
            }
            continue;
        }
        sections[i].push(line);
    }
    Ok(TxnRequest {
        compare: sections[0]
            .iter()
            .map(|l| parse_compare(l))
            .collect::<Result<_, _>>()?,
        success: sections[1]
            .iter()
            .map(|l| parse_op(l))
            .collect::<Result<_, _>>()?,
        failure: sections[2]
            .iter()
            .map(|l| parse_op(l))
            .collect::<Result<_, _>>()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_etcdctl_example() {
        let t = parse("mod(\"key1\") > \"0\"\nvalue(\"k2\") = \"a b\"\n\nput key1 \"overwrote-key1\"\nget k --prefix\n\nput key1 \"created-key1\"\ndel k2\n").unwrap();
        assert_eq!(t.compare.len(), 2);
        assert_eq!(t.compare[0].target, CompareTarget::Mod(0));
        assert_eq!(t.compare[1].target, CompareTarget::Value(b"a b".to_vec()));
        assert_eq!(t.success.len(), 2);
        assert_eq!(t.failure.len(), 2);
        match &t.success[0] {
            RequestOp::Put(p) => assert_eq!(p.value, b"overwrote-key1"),
            other => panic!("{other:?}"),
        }
        assert!(parse("bogus line\n\n").is_err());
    }
}
