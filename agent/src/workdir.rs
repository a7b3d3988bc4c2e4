//! Paths under the agent's work dir. Ids from clients become directory
//! names here, so every such path is built by `beneath`, which takes each
//! id as one directory name by the id rule: nothing upstream can turn into a
//! path outside the root, even if a check there is missed.

use std::path::{Path, PathBuf};

use butte_api::ids::{IdError, check_id};

/// `root` joined with one directory per `(field, id)`; refused (naming the
/// field) unless every id is a plain directory name.
pub fn beneath(root: &Path, ids: &[(&str, &str)]) -> Result<PathBuf, IdError> {
    let mut path = root.to_owned();
    for &(field, id) in ids {
        check_id(field, id)?;
        path.push(id);
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_names_go_below_the_root() {
        let root = Path::new("/var/lib/butte/agent/sandboxes");
        assert_eq!(
            beneath(root, &[("framework_id", "f-1"), ("task_id", "t.1")]),
            Ok(root.join("f-1").join("t.1"))
        );
        for (id, field) in [
            ("..", "task_id"),
            ("../../etc", "task_id"),
            ("/etc", "task_id"),
            ("", "task_id"),
        ] {
            let refused = beneath(root, &[("framework_id", "f"), (field, id)]).expect_err(id);
            assert_eq!(refused.field, field, "{id:?}");
        }
    }
}
