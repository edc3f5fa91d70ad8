//! Where a service's endpoints run: placement constraints, and spreading endpoints over the
//! eligible nodes (at most one endpoint of a service per node).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use mesh_api::ids::NodeId;

/// A placement constraint on nodes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Constraint {
    /// `node.labels.KEY==VALUE`
    Label { key: String, value: String },
    /// `node.id==ID`
    NodeId(NodeId),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("constraint `{given}` is not valid: {why}; expected `node.labels.KEY==VALUE` or `node.id==ID`")]
pub struct InvalidConstraint {
    pub given: String,
    pub why: String,
}

/// A label key or value: 1 to 63 characters of a-z, A-Z, 0-9, `-`, `_`, `.`.
pub fn valid_label_part(s: &str) -> bool {
    !s.is_empty() && s.len() <= 63 && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

impl FromStr for Constraint {
    type Err = InvalidConstraint;
    fn from_str(s: &str) -> Result<Constraint, InvalidConstraint> {
        let err = |why: &str| InvalidConstraint { given: s.to_owned(), why: why.to_owned() };
        let (lhs, rhs) = s.split_once("==").ok_or_else(|| err("no `==`"))?;
        let (lhs, rhs) = (lhs.trim(), rhs.trim());
        if lhs == "node.id" {
            return rhs.parse().map(Constraint::NodeId).map_err(|e| err(&e.to_string()));
        }
        let key =
            lhs.strip_prefix("node.labels.").ok_or_else(|| err(&format!("unknown attribute `{lhs}`")))?;
        if !valid_label_part(key) || !valid_label_part(rhs) {
            return Err(err("label keys and values are 1-63 characters of a-z, A-Z, 0-9, `-`, `_`, `.`"));
        }
        Ok(Constraint::Label { key: key.to_owned(), value: rhs.to_owned() })
    }
}

impl TryFrom<String> for Constraint {
    type Error = InvalidConstraint;
    fn try_from(s: String) -> Result<Constraint, InvalidConstraint> {
        s.parse()
    }
}

impl From<Constraint> for String {
    fn from(c: Constraint) -> String {
        c.to_string()
    }
}

impl fmt::Display for Constraint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Constraint::Label { key, value } => write!(f, "node.labels.{key}=={value}"),
            Constraint::NodeId(id) => write!(f, "node.id=={id}"),
        }
    }
}

impl Constraint {
    pub fn allows(&self, node: &NodeId, labels: &BTreeMap<String, String>) -> bool {
        match self {
            Constraint::Label { key, value } => labels.get(key) == Some(value),
            Constraint::NodeId(id) => id == node,
        }
    }
}

/// Chooses nodes for `wanted` endpoints of a service.
///
/// `keep` are the nodes that already run one and remain eligible: they keep theirs (so a
/// reconcile never moves a healthy endpoint). New endpoints go to the eligible nodes without one,
/// least loaded first (`load`: endpoints of all services per node), ties broken by node ID so the
/// choice is deterministic. Returns the nodes to add; fewer than asked when too few are eligible.
pub fn choose(
    wanted: usize,
    keep: &BTreeSet<NodeId>,
    eligible: &BTreeSet<NodeId>,
    load: &BTreeMap<NodeId, usize>,
) -> Vec<NodeId> {
    let missing = wanted.saturating_sub(keep.len());
    let mut candidates: Vec<&NodeId> = eligible.iter().filter(|n| !keep.contains(*n)).collect();
    candidates.sort_by_key(|n| (load.get(*n).copied().unwrap_or(0), (*n).clone()));
    candidates.into_iter().take(missing).cloned().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constraints_parse_and_print_back() {
        let id = NodeId::random();
        for text in ["node.labels.zone==dmz".to_owned(), format!("node.id=={id}")] {
            let c: Constraint = text.parse().unwrap();
            assert_eq!(c.to_string(), text);
        }
        for bad in
            ["zone==dmz", "node.labels.zone=dmz", "node.labels.==x", "node.id==nope", "node.labels.a b==c"]
        {
            let err = bad.parse::<Constraint>().unwrap_err();
            assert!(err.to_string().contains(bad), "{err}");
        }
    }

    #[test]
    fn spreads_to_the_least_loaded_and_keeps_what_runs() {
        let ids: Vec<NodeId> = (0..4).map(|_| NodeId::random()).collect();
        let eligible: BTreeSet<NodeId> = ids.iter().cloned().collect();
        let load: BTreeMap<NodeId, usize> =
            [(ids[0].clone(), 5), (ids[1].clone(), 0), (ids[2].clone(), 1)].into();
        let keep: BTreeSet<NodeId> = [ids[2].clone()].into();
        let chosen = choose(3, &keep, &eligible, &load);
        assert_eq!(chosen.len(), 2);
        assert!(!chosen.contains(&ids[2]) && !chosen.contains(&ids[0]), "least loaded first");
        assert!(choose(9, &keep, &eligible, &load).len() == 3, "only as many as are eligible");
        assert!(choose(1, &keep, &eligible, &load).is_empty(), "already satisfied");
    }
}
