//! Authorization by Mesos's ACL file (`--acls`): for each action, rules in
//! order, each a subject (`principals`) and an object (roles, users...);
//! the first rule whose subject and object match the request decides, and
//! where none does, `permissive` does (Mesos's local authorizer). An entity
//! is `{"values": [...]}`, `{"type": "ANY"}` or `{"type": "NONE"}`. An
//! action this master does not check is refused at start, by name, rather
//! than silently ignored.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

/// What an ACL guards, with the JSON names of its rules' object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    /// SUBSCRIBE in a role (object: the role).
    RegisterFrameworks,
    /// A task run as a user (object: the task's effective user).
    RunTasks,
    /// The operator's TEARDOWN of a framework (object: its principal).
    TeardownFrameworks,
    /// A framework in the state views (object: the framework's user).
    ViewFrameworks,
    /// A task in the state views (object: the task's user).
    ViewTasks,
    /// An executor in the state views (object: its framework's user).
    ViewExecutors,
    /// A GET of a guarded endpoint (object: its path).
    GetEndpoints,
    /// MARK_AGENT_GONE (object: the agents, ANY).
    MarkAgentsGone,
}

const ACTIONS: [(Action, &str, &str); 8] = [
    (Action::RegisterFrameworks, "register_frameworks", "roles"),
    (Action::RunTasks, "run_tasks", "users"),
    (
        Action::TeardownFrameworks,
        "teardown_frameworks",
        "framework_principals",
    ),
    (Action::ViewFrameworks, "view_frameworks", "users"),
    (Action::ViewTasks, "view_tasks", "users"),
    (Action::ViewExecutors, "view_executors", "users"),
    (Action::GetEndpoints, "get_endpoints", "paths"),
    (Action::MarkAgentsGone, "mark_agents_gone", "agents"),
];

impl Action {
    /// Its name in the ACL file (and in refusals).
    pub fn name(self) -> &'static str {
        ACTIONS
            .iter()
            .find(|(action, _, _)| *action == self)
            .map_or("?", |(_, name, _)| name)
    }
}

/// `{"values": [...]}`, ANY or NONE.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Entity {
    Some(Vec<String>),
    Any,
    None,
}

impl Entity {
    fn parse(value: &Value) -> Result<Self, String> {
        let kind = value.get("type").and_then(Value::as_str);
        let values = value.get("values");
        match (kind, values) {
            (Some("ANY"), None) => Ok(Entity::Any),
            (Some("NONE"), None) => Ok(Entity::None),
            (None | Some("SOME"), Some(Value::Array(values))) => values
                .iter()
                .map(|v| {
                    v.as_str()
                        .map(str::to_owned)
                        .ok_or_else(|| format!("{v} is not a string"))
                })
                .collect::<Result<_, _>>()
                .map(Entity::Some),
            _ => Err(format!(
                "{value} is not an entity: use {{\"values\": [...]}}, {{\"type\": \"ANY\"}} or {{\"type\": \"NONE\"}}"
            )),
        }
    }

    /// Whether a rule with this entity applies to `request` (one value, or
    /// None: the request names nobody, as Mesos's ANY).
    fn matches(&self, request: Option<&str>) -> bool {
        match (self, request) {
            (Entity::Some(values), Some(value)) => values.iter().any(|v| v == value),
            (Entity::Some(_), None) => false,
            (Entity::Any | Entity::None, _) => true,
        }
    }

    /// Whether a rule that applies lets the request through.
    fn allows(&self) -> bool {
        !matches!(self, Entity::None)
    }
}

#[derive(Debug, Clone)]
struct Rule {
    principals: Entity,
    object: Entity,
}

/// Why the ACL file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum AclError {
    #[error("cannot read the ACL file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the ACL file {path} is not Mesos's ACL JSON: {reason}")]
    Format { path: PathBuf, reason: String },
}

/// The rules per action, and what holds where none matches.
#[derive(Debug, Clone)]
pub struct Acls {
    permissive: bool,
    rules: HashMap<Action, Vec<Rule>>,
}

impl Default for Acls {
    /// No ACLs: everything is allowed, as Mesos without `--acls`.
    fn default() -> Self {
        Self {
            permissive: true,
            rules: HashMap::new(),
        }
    }
}

impl Acls {
    pub fn load(path: &Path) -> Result<Self, AclError> {
        let text = std::fs::read_to_string(path).map_err(|source| AclError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text).map_err(|reason| AclError::Format {
            path: path.to_owned(),
            reason,
        })
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        let file: Value = serde_json::from_str(text).map_err(|e| format!("bad JSON: {e}"))?;
        let Value::Object(fields) = file else {
            return Err("it is not a JSON object".into());
        };
        let mut acls = Acls::default();
        for (key, value) in &fields {
            if key == "permissive" {
                acls.permissive = value
                    .as_bool()
                    .ok_or_else(|| format!("'permissive' is {value}, not true or false"))?;
                continue;
            }
            let Some(&(action, _, object)) = ACTIONS.iter().find(|(_, name, _)| name == key) else {
                let known: Vec<&str> = ACTIONS.iter().map(|(_, name, _)| *name).collect();
                return Err(format!(
                    "'{key}' is not checked by this master (it checks {}); remove it rather than have it ignored",
                    known.join(", ")
                ));
            };
            let Value::Array(rules) = value else {
                return Err(format!("'{key}' is not a list of rules"));
            };
            let rules = rules
                .iter()
                .enumerate()
                .map(|(n, rule)| {
                    let field = |name: &str| {
                        rule.get(name)
                            .ok_or_else(|| format!("rule {} of '{key}' has no '{name}'", n + 1))
                            .and_then(|v| {
                                Entity::parse(v)
                                    .map_err(|e| format!("'{key}' rule {} '{name}': {e}", n + 1))
                            })
                    };
                    Ok(Rule {
                        principals: field("principals")?,
                        object: field(object)?,
                    })
                })
                .collect::<Result<Vec<_>, String>>()?;
            acls.rules.insert(action, rules);
        }
        Ok(acls)
    }

    /// Whether `principal` (None: nobody authenticated) may do `action` on
    /// `object` (None: any object, as MARK_AGENT_GONE's agents).
    pub fn allows(&self, action: Action, principal: Option<&str>, object: Option<&str>) -> bool {
        let rules = self.rules.get(&action).map_or(&[][..], Vec::as_slice);
        rules
            .iter()
            .find(|rule| rule.principals.matches(principal) && rule.object.matches(object))
            .map_or(self.permissive, |rule| {
                rule.principals.allows() && rule.object.allows()
            })
    }

    /// As `allows`, refusing with the action and its parties named.
    pub fn check(
        &self,
        action: Action,
        principal: Option<&str>,
        object: Option<&str>,
    ) -> Result<(), String> {
        if self.allows(action, principal, object) {
            return Ok(());
        }
        let who = principal.map_or("an unauthenticated request".to_owned(), |p| {
            format!("principal '{p}'")
        });
        Err(match object {
            Some(object) => format!(
                "{who} is not authorized to {} '{object}' (ACL {})",
                verb(action),
                action.name()
            ),
            None => format!(
                "{who} is not authorized to {} (ACL {})",
                verb(action),
                action.name()
            ),
        })
    }
}

fn verb(action: Action) -> &'static str {
    match action {
        Action::RegisterFrameworks => "register a framework in role",
        Action::RunTasks => "run tasks as user",
        Action::TeardownFrameworks => "tear down frameworks of principal",
        Action::ViewFrameworks => "view frameworks of user",
        Action::ViewTasks => "view tasks of user",
        Action::ViewExecutors => "view executors of user",
        Action::GetEndpoints => "get the endpoint",
        Action::MarkAgentsGone => "mark agents gone",
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_first_matching_rule_decides_and_permissive_covers_the_rest() {
        let acls = Acls::parse(
            r#"{
              "permissive": false,
              "register_frameworks": [
                {"principals": {"values": ["a"]}, "roles": {"values": ["a"]}},
                {"principals": {"values": ["a"]}, "roles": {"type": "NONE"}},
                {"principals": {"type": "ANY"}, "roles": {"values": ["shared"]}}
              ],
              "run_tasks": [
                {"principals": {"values": ["web"]}, "users": {"values": ["nobody"]}},
                {"principals": {"values": ["web"]}, "users": {"type": "NONE"}}
              ]
            }"#,
        )
        .unwrap();
        let register = |p, r| acls.allows(Action::RegisterFrameworks, p, Some(r));
        assert!(register(Some("a"), "a"));
        assert!(!register(Some("a"), "b"), "a only in a");
        assert!(!register(Some("a"), "shared"), "a's NONE comes first");
        assert!(register(Some("c"), "shared"));
        assert!(register(None, "shared"), "ANY covers the unauthenticated");
        assert!(!register(Some("c"), "b"), "no rule: not permissive");
        assert!(acls.allows(Action::RunTasks, Some("web"), Some("nobody")));
        let refused = acls
            .check(Action::RunTasks, Some("web"), Some("root"))
            .unwrap_err();
        assert!(
            refused.contains("'web'")
                && refused.contains("'root'")
                && refused.contains("run_tasks"),
            "{refused}"
        );
        assert!(!acls.allows(Action::MarkAgentsGone, Some("ops"), None));
        assert!(Acls::default().allows(Action::MarkAgentsGone, None, None));
    }

    #[test]
    fn an_acl_this_master_does_not_check_is_refused_by_name() {
        let refused = Acls::parse(r#"{"reserve_resources": []}"#).unwrap_err();
        assert!(refused.contains("'reserve_resources'"), "{refused}");
        let bad = Acls::parse(r#"{"run_tasks": [{"principals": {"values": ["a"]}}]}"#).unwrap_err();
        assert!(bad.contains("'users'"), "{bad}");
        let entity = Acls::parse(
            r#"{"run_tasks": [{"principals": {"type": "SOMETIMES"}, "users": {"type": "ANY"}}]}"#,
        )
        .unwrap_err();
        assert!(entity.contains("not an entity"), "{entity}");
    }
}
