//! Parsing JSON that is still arriving (a tool's input streamed in deltas), the way the AI SDK
//! does: parse as is, else close what is open and drop a trailing partial token, else nothing.

use serde_json::Value;

/// The value of `text` so far, or `None` if even the repaired text does not parse.
pub fn parse_partial(text: &str) -> Option<Value> {
    serde_json::from_str(text)
        .or_else(|_| serde_json::from_str(&repair(text)))
        .ok()
        .map(js_numbers)
}

/// JavaScript has one number type: an integral float prints as an integer.
pub fn js_numbers(value: Value) -> Value {
    match value {
        Value::Number(number) if number.is_f64() => {
            let float = number.as_f64().unwrap_or_default();
            if float.fract() == 0.0 && float.abs() < 9_007_199_254_740_992.0 {
                Value::from(float as i64)
            } else {
                Value::Number(number)
            }
        }
        Value::Array(items) => Value::Array(items.into_iter().map(js_numbers).collect()),
        Value::Object(map) => Value::Object(map.into_iter().map(|(k, v)| (k, js_numbers(v))).collect()),
        other => other,
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum State {
    Root,
    Finish,
    ObjectStart,
    ObjectAfterComma,
    ObjectKey,
    ObjectAfterKey,
    ObjectBeforeValue,
    ObjectAfterValue,
    String,
    StringEscape,
    StringUnicodeEscape,
    ArrayStart,
    ArrayAfterValue,
    ArrayAfterComma,
    Number,
    Literal,
}

/// Closes open strings, arrays and objects and cuts an unfinished trailing token.
fn repair(input: &str) -> String {
    let mut stack = vec![State::Root];
    let mut last_valid: Option<usize> = None; // byte index of the last char kept
    let mut literal_start = 0usize;
    let mut unicode_digits = 0;

    fn value_start(
        stack: &mut Vec<State>,
        c: char,
        i: usize,
        swap: State,
        last_valid: &mut Option<usize>,
        literal_start: &mut usize,
    ) {
        let inner = match c {
            '"' => State::String,
            'f' | 't' | 'n' => {
                *literal_start = i;
                State::Literal
            }
            '-' => State::Number,
            '0'..='9' => State::Number,
            '{' => State::ObjectStart,
            '[' => State::ArrayStart,
            _ => return,
        };
        if c != '-' {
            *last_valid = Some(i);
        }
        stack.pop();
        stack.push(swap);
        stack.push(inner);
    }
    fn after_object_value(stack: &mut Vec<State>, c: char, i: usize, last_valid: &mut Option<usize>) {
        match c {
            ',' => {
                stack.pop();
                stack.push(State::ObjectAfterComma);
            }
            '}' => {
                *last_valid = Some(i);
                stack.pop();
            }
            _ => {}
        }
    }
    fn after_array_value(stack: &mut Vec<State>, c: char, i: usize, last_valid: &mut Option<usize>) {
        match c {
            ',' => {
                stack.pop();
                stack.push(State::ArrayAfterComma);
            }
            ']' => {
                *last_valid = Some(i);
                stack.pop();
            }
            _ => {}
        }
    }

    for (i, c) in input.char_indices() {
        let top = *stack.last().unwrap_or(&State::Finish);
        match top {
            State::Root => value_start(&mut stack, c, i, State::Finish, &mut last_valid, &mut literal_start),
            State::ObjectStart => match c {
                '"' => {
                    stack.pop();
                    stack.push(State::ObjectKey);
                }
                '}' => {
                    last_valid = Some(i);
                    stack.pop();
                }
                _ => {}
            },
            State::ObjectAfterComma => {
                if c == '"' {
                    stack.pop();
                    stack.push(State::ObjectKey);
                }
            }
            State::ObjectKey => {
                if c == '"' {
                    stack.pop();
                    stack.push(State::ObjectAfterKey);
                }
            }
            State::ObjectAfterKey => {
                if c == ':' {
                    stack.pop();
                    stack.push(State::ObjectBeforeValue);
                }
            }
            State::ObjectBeforeValue => value_start(
                &mut stack,
                c,
                i,
                State::ObjectAfterValue,
                &mut last_valid,
                &mut literal_start,
            ),
            State::ObjectAfterValue => after_object_value(&mut stack, c, i, &mut last_valid),
            State::String => match c {
                '"' => {
                    stack.pop();
                    last_valid = Some(i);
                }
                '\\' => stack.push(State::StringEscape),
                _ => last_valid = Some(i),
            },
            State::ArrayStart => match c {
                ']' => {
                    last_valid = Some(i);
                    stack.pop();
                }
                _ => value_start(
                    &mut stack,
                    c,
                    i,
                    State::ArrayAfterValue,
                    &mut last_valid,
                    &mut literal_start,
                ),
            },
            State::ArrayAfterValue => match c {
                ',' => {
                    stack.pop();
                    stack.push(State::ArrayAfterComma);
                }
                ']' => {
                    last_valid = Some(i);
                    stack.pop();
                }
                _ => last_valid = Some(i),
            },
            State::ArrayAfterComma => value_start(
                &mut stack,
                c,
                i,
                State::ArrayAfterValue,
                &mut last_valid,
                &mut literal_start,
            ),
            State::StringEscape => {
                stack.pop();
                if c == 'u' {
                    unicode_digits = 0;
                    stack.push(State::StringUnicodeEscape);
                } else {
                    last_valid = Some(i);
                }
            }
            State::StringUnicodeEscape => {
                if c.is_ascii_hexdigit() {
                    unicode_digits += 1;
                    if unicode_digits == 4 {
                        stack.pop();
                        last_valid = Some(i);
                    }
                }
            }
            State::Number => match c {
                '0'..='9' => last_valid = Some(i),
                'e' | 'E' | '-' | '.' => {}
                ',' => {
                    stack.pop();
                    match stack.last() {
                        Some(State::ArrayAfterValue) => after_array_value(&mut stack, c, i, &mut last_valid),
                        Some(State::ObjectAfterValue) => after_object_value(&mut stack, c, i, &mut last_valid),
                        _ => {}
                    }
                }
                '}' => {
                    stack.pop();
                    if stack.last() == Some(&State::ObjectAfterValue) {
                        after_object_value(&mut stack, c, i, &mut last_valid);
                    }
                }
                ']' => {
                    stack.pop();
                    if stack.last() == Some(&State::ArrayAfterValue) {
                        after_array_value(&mut stack, c, i, &mut last_valid);
                    }
                }
                _ => {
                    stack.pop();
                }
            },
            State::Literal => {
                let partial = &input[literal_start..i + c.len_utf8()];
                if !"false".starts_with(partial) && !"true".starts_with(partial) && !"null".starts_with(partial) {
                    stack.pop();
                    match stack.last() {
                        Some(State::ObjectAfterValue) => after_object_value(&mut stack, c, i, &mut last_valid),
                        Some(State::ArrayAfterValue) => after_array_value(&mut stack, c, i, &mut last_valid),
                        _ => {}
                    }
                } else {
                    last_valid = Some(i);
                }
            }
            State::Finish => {}
        }
    }

    let kept_end = last_valid.map_or(0, |i| i + input[i..].chars().next().map_or(1, char::len_utf8));
    let mut result = input[..kept_end].to_string();
    for state in stack.iter().rev() {
        match state {
            State::String => result.push('"'),
            State::ObjectKey
            | State::ObjectAfterKey
            | State::ObjectAfterComma
            | State::ObjectStart
            | State::ObjectBeforeValue
            | State::ObjectAfterValue => result.push('}'),
            State::ArrayStart | State::ArrayAfterComma | State::ArrayAfterValue => result.push(']'),
            State::Literal => {
                let partial = &input[literal_start..];
                if let Some(rest) = ["true", "false", "null"]
                    .iter()
                    .find_map(|literal| literal.strip_prefix(partial))
                {
                    result.push_str(rest);
                }
            }
            _ => {}
        }
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn complete_json_parses_as_is() {
        assert_eq!(parse_partial(r#"{"a":[1,2]}"#), Some(json!({"a": [1, 2]})));
    }

    #[test]
    fn unfinished_json_is_closed() {
        assert_eq!(parse_partial(r#"{"city": "Par"#), Some(json!({"city": "Par"})));
        assert_eq!(parse_partial(r#"{"a": tr"#), Some(json!({"a": true})));
        assert_eq!(parse_partial(r#"{"a": [1, 2"#), Some(json!({"a": [1, 2]})));
        assert_eq!(parse_partial(r#"{"a": 1, "b""#), Some(json!({"a": 1})));
        assert_eq!(parse_partial(r#"{"s": "x\u00"#), Some(json!({"s": "x"})));
        assert_eq!(parse_partial(r#"["é", "ü"#), Some(json!(["é", "ü"])));
        assert_eq!(parse_partial(""), None);
    }
}
