//! The rule every id a client gives must follow before it is used (Mesos's
//! id validation and more): ids become directory names on the agent, so
//! nothing that could name another directory gets through.

/// The longest id accepted, in bytes.
pub const MAX_ID_BYTES: usize = 255;

/// Why an id was refused; `field` names where it came from.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("'{field}' {problem}")]
pub struct IdError {
    pub field: String,
    pub problem: String,
}

/// Checks one id: non-empty, at most 255 bytes, not `.` or `..`, and no
/// `/`, `\`, NUL or other control character.
pub fn check_id(field: &str, id: &str) -> Result<(), IdError> {
    let refuse = |problem: String| {
        Err(IdError {
            field: field.to_owned(),
            problem,
        })
    };
    if id.is_empty() {
        return refuse("is empty; give a non-empty id".to_owned());
    }
    if id.len() > MAX_ID_BYTES {
        return refuse(format!(
            "is {} bytes long; ids are at most {MAX_ID_BYTES} bytes",
            id.len()
        ));
    }
    if id == "." || id == ".." {
        return refuse(format!("is {id:?}; an id cannot be '.' or '..'"));
    }
    if let Some(bad) = id
        .chars()
        .find(|&c| c == '/' || c == '\\' || c.is_control())
    {
        return refuse(format!(
            "{id:?} contains {bad:?}; ids cannot contain '/', '\\\\', NUL or control characters"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_rule_refuses_what_it_names_and_keeps_ordinary_ids() {
        for good in [
            "t",
            "task-1",
            "a.b",
            "..a",
            "a..",
            "ümlaut",
            &"x".repeat(255),
        ] {
            assert_eq!(check_id("task_id", good), Ok(()), "{good:?}");
        }
        for (bad, says) in [
            ("", "empty"),
            (".", "'.' or '..'"),
            ("..", "'.' or '..'"),
            ("a/b", "'/'"),
            ("../x", "'/'"),
            ("a\\b", "contains '\\\\'"),
            ("a\0b", "contains '\\0'"),
            ("a\nb", "contains '\\n'"),
            ("a\u{7f}", "contains '\\u{7f}'"),
        ] {
            let error = check_id("task_id", bad).expect_err(bad).to_string();
            assert!(error.starts_with("'task_id' "), "{error}");
            assert!(error.contains(says), "{bad:?}: {error}");
        }
        let long = check_id("framework_id", &"x".repeat(256)).expect_err("256 bytes");
        assert!(long.to_string().contains("256 bytes"), "{long}");
    }
}
