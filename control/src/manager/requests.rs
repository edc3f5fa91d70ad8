//! Control's requests to nodes (an endpoint's output, for `meshctl service logs`): each node
//! holds a `Requests` stream on which they are pushed, and answers each with `AnswerLogs`. An
//! answer counts only from the node the request went to, and only once; an unanswered request
//! times out.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use mesh_api::ids::NodeId;
use mesh_api::model::LogLine;
use mesh_api::proto::pb;
use tokio::sync::{mpsc, oneshot};

/// How long an admin waits for a node's answer.
pub const ANSWER_WITHIN: Duration = Duration::from_secs(5);
/// Requests queued for one node at most (more are refused at once).
const QUEUED: usize = 16;

/// Where a node's answer goes: the admin call waiting for it.
type Answer = oneshot::Sender<Result<Vec<LogLine>, String>>;

#[derive(Default)]
pub struct Requests {
    next: AtomicU64,
    nodes: Mutex<HashMap<NodeId, mpsc::Sender<pb::NodeRequest>>>,
    waiting: Mutex<HashMap<u64, (NodeId, Answer)>>,
}

impl Requests {
    /// The stream of requests for `node` (a newer one replaces the one it held).
    pub fn attach(&self, node: &NodeId) -> mpsc::Receiver<pb::NodeRequest> {
        let (tx, rx) = mpsc::channel(QUEUED);
        self.nodes.lock().expect("lock").insert(node.clone(), tx);
        rx
    }

    /// Asks `node` for the output of its endpoint `service`.`slot`.
    pub async fn logs(
        &self,
        node: &NodeId,
        service: &str,
        slot: u32,
        tail: u32,
        since_millis: i64,
    ) -> Result<Vec<LogLine>, String> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let sender = self.nodes.lock().expect("lock").get(node).cloned();
        let Some(sender) = sender else { return Err(format!("node {node} holds no session here")) };
        let (tx, rx) = oneshot::channel();
        self.waiting.lock().expect("lock").insert(id, (node.clone(), tx));
        let request = pb::NodeRequest { id, service: service.to_owned(), slot, tail, since_millis };
        let answer = match sender.try_send(request) {
            Ok(()) => match tokio::time::timeout(ANSWER_WITHIN, rx).await {
                Ok(Ok(answer)) => answer,
                Ok(Err(_)) | Err(_) => Err(format!("node {node} did not answer within {ANSWER_WITHIN:?}")),
            },
            Err(_) => Err(format!("node {node} is busy or gone")),
        };
        self.waiting.lock().expect("lock").remove(&id);
        answer
    }

    /// `node`'s answer to request `id`: ignored unless that request went to `node` and waits.
    pub fn answer(&self, node: &NodeId, id: u64, answer: Result<Vec<LogLine>, String>) -> bool {
        let mut waiting = self.waiting.lock().expect("lock");
        match waiting.get(&id) {
            Some((to, _)) if to == node => {
                let (_, tx) = waiting.remove(&id).expect("just seen");
                tx.send(answer).is_ok()
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn only_the_node_asked_answers_and_only_once() {
        let requests = std::sync::Arc::new(Requests::default());
        let (a, b) = (NodeId::random(), NodeId::random());
        let mut to_a = requests.attach(&a);
        let asking = {
            let requests = requests.clone();
            let a = a.clone();
            tokio::spawn(async move { requests.logs(&a, "api", 1, 10, 0).await })
        };
        let request = to_a.recv().await.unwrap();
        assert_eq!((request.service.as_str(), request.slot, request.tail), ("api", 1, 10));
        let line = LogLine { at_millis: 1, stream: "stdout".into(), text: "hello".into() };
        // Another node answering a's request, or an unknown request: ignored.
        assert!(!requests.answer(&b, request.id, Ok(vec![])));
        assert!(!requests.answer(&a, request.id + 1000, Ok(vec![])));
        assert!(requests.answer(&a, request.id, Ok(vec![line.clone()])));
        assert!(!requests.answer(&a, request.id, Ok(vec![])), "answered twice");
        assert_eq!(asking.await.unwrap(), Ok(vec![line]));
        // A node holding no stream is an error at once.
        let none = requests.logs(&b, "api", 1, 10, 0).await.unwrap_err();
        assert!(none.contains("holds no session"), "{none}");
    }
}
