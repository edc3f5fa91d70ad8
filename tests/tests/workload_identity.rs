//! Workload identity: control signs a workload certificate only for an endpoint it placed on the
//! asking node; the certificate carries the service's SPIFFE ID and lives an hour.

use std::net::SocketAddr;
use std::time::Duration;

use control::config::ManagerOptions;
use mesh_api::pki::CertInfo;
use mesh_api::proto::pb;
use mesh_tests::{SimNode, TestCluster};
use meshd::identity::{IdentityError, workload_certificate};
use time::OffsetDateTime;
use tonic::Code;
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

fn refused(result: Result<impl std::fmt::Debug, IdentityError>) -> String {
    match result {
        Err(IdentityError::Client(e)) if e.code() == Some(Code::PermissionDenied) => e.to_string(),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn a_node_gets_certificates_only_for_endpoints_placed_on_it() {
    let cluster = TestCluster::start_with(Duration::from_secs(3600), ManagerOptions::default()).await;
    let a = SimNode::start(&cluster, SocketAddr::from(([127, 0, 2, 1], 4800))).await;
    let b = SimNode::start(&cluster, SocketAddr::from(([127, 0, 2, 2], 4800))).await;
    let mut admin = cluster.admin().await;
    admin.create_network("front", "10.90.0.0/24", true).await.unwrap();
    admin
        .create_service(pb::CreateServiceRequest {
            name: "api".into(),
            networks: vec!["front".into()],
            ports: vec![],
            replicas: 1,
            constraints: vec![format!("node.id=={}", a.id)],
            command: String::new(),
            run: None,
            signed: None,
            publish: vec![],
        })
        .await
        .unwrap();

    let issued = workload_certificate(&a.state_dir(), "api", 1).await.unwrap();
    let der = mesh_api::pki::pem_to_der(&issued.identity.cert_pem).unwrap();
    let (_, cert) = X509Certificate::from_der(&der).unwrap();
    let cluster_id = cluster.manager.store().read(|s| s.cluster_id.clone());
    let uris: Vec<String> = cert
        .subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names
        .iter()
        .filter_map(|n| if let GeneralName::URI(u) = n { Some(u.to_string()) } else { None })
        .collect();
    assert_eq!(uris, [format!("spiffe://{cluster_id}/svc/api")]);
    let info = CertInfo::from_der(&der).unwrap();
    assert_eq!(
        (info.common_name.as_str(), info.unit.as_str()),
        (format!("api.1@{}", a.id).as_str(), "mesh-workload")
    );
    let life = issued.not_after - OffsetDateTime::now_utc();
    assert!(life > time::Duration::minutes(58) && life <= time::Duration::minutes(60), "{life}");

    // Another node asking for api's certificate is refused; so is a slot that does not exist.
    let message = refused(workload_certificate(&b.state_dir(), "api", 1).await);
    assert!(message.contains("not placed on node"), "{message}");
    refused(workload_certificate(&a.state_dir(), "api", 2).await);
    refused(workload_certificate(&a.state_dir(), "nothing", 1).await);

    // A workload certificate is no node certificate: it cannot renew, open a session or administer.
    let channel = cluster.channel_as(Some(&issued.identity)).await;
    let err = pb::identity_client::IdentityClient::new(channel.clone())
        .renew(pb::RenewRequest { csr_pem: String::new() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    let err = pb::dispatcher_client::DispatcherClient::new(channel)
        .session(pb::SessionRequest { underlay: String::new(), boot: 0 })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);

    // A removed node gets nothing more.
    admin.remove_node(a.id.as_str(), false).await.unwrap();
    refused(workload_certificate(&a.state_dir(), "api", 1).await);
}
