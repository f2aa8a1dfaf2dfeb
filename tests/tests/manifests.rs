//! The invariants that make kvset work on Kubernetes, checked on the rendered manifests of the
//! base and of every overlay: names that must match, ports and paths the binary really uses,
//! environment variables it really reads, RBAC exactly as wide as the replicas source needs.
//! (`scripts/check.sh` also validates the same renderings against the Kubernetes schemas with
//! `kubernetes-validate --strict`.)

use std::collections::BTreeMap;
use std::collections::BTreeSet;

use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kvset_server::config::env_var;
use kvset_server::Config;
use kvset_tests::manifests::render;
use kvset_tests::manifests::repo_root;
use kvset_tests::manifests::Rendered;

/// Every kustomization a user may apply.
fn renderings() -> Vec<Rendered> {
    let mut dirs = vec!["deploy/k8s".to_string()];
    let overlays = repo_root().join("deploy/k8s/overlays");
    for entry in std::fs::read_dir(&overlays).expect("deploy/k8s/overlays") {
        let name = entry.expect("entry").file_name().to_string_lossy().into_owned();
        dirs.push(format!("deploy/k8s/overlays/{name}"));
    }
    dirs.iter().map(|d| render(d).unwrap_or_else(|e| panic!("{e}"))).collect()
}

fn port_by_name(r: &Rendered, name: &str) -> i32 {
    r.container()
        .ports
        .unwrap_or_default()
        .into_iter()
        .find(|p| p.name.as_deref() == Some(name))
        .unwrap_or_else(|| panic!("{}: container port {name} missing", r.dir))
        .container_port
}

fn resolve_port(r: &Rendered, port: &IntOrString) -> i32 {
    match port {
        IntOrString::Int(p) => *p,
        IntOrString::String(name) => port_by_name(r, name),
    }
}

fn env(r: &Rendered) -> BTreeMap<String, k8s_openapi::api::core::v1::EnvVar> {
    r.container().env.unwrap_or_default().into_iter().map(|e| (e.name.clone(), e)).collect()
}

#[test]
fn manifests_agree_with_the_binary() {
    let defaults = Config::default();
    for r in renderings() {
        let sts = r.statefulset();
        let spec = sts.spec.clone().expect("spec");
        let pod = spec.template.spec.clone().expect("pod spec");
        let labels = spec.template.metadata.clone().and_then(|m| m.labels).unwrap_or_default();
        let dir = &r.dir;

        // The headless Service: the StatefulSet's serviceName, no cluster IP, publishing
        // not-ready pods (members must find each other before any is ready).
        let service_name = spec.service_name.clone().expect("serviceName");
        let headless = r.service(&service_name);
        let hs = headless.spec.clone().expect("service spec");
        assert_eq!(hs.cluster_ip.as_deref(), Some("None"), "{dir}: {service_name} must be headless");
        assert_eq!(hs.publish_not_ready_addresses, Some(true), "{dir}: publishNotReadyAddresses");
        let kvset_service =
            env(&r).get("KVSET_SERVICE").and_then(|e| e.value.clone()).unwrap_or(defaults.service.clone());
        assert_eq!(kvset_service, service_name, "{dir}: the members' `service` must be the headless Service");
        assert_eq!(sts.metadata.name.as_deref(), Some("kvset"));
        assert_eq!(spec.pod_management_policy.as_deref(), Some("Parallel"), "{dir}");

        // Every Service selects the pods.
        for svc in r.services() {
            let selector = svc.spec.clone().and_then(|s| s.selector).unwrap_or_default();
            assert!(!selector.is_empty(), "{dir}: Service {:?} selects nothing", svc.metadata.name);
            for (k, v) in &selector {
                assert_eq!(
                    labels.get(k),
                    Some(v),
                    "{dir}: Service {:?} does not select the pods",
                    svc.metadata.name
                );
            }
            for p in svc.spec.clone().and_then(|s| s.ports).unwrap_or_default() {
                let target = p.target_port.as_ref().map(|t| resolve_port(&r, t)).unwrap_or(p.port);
                assert_eq!(p.port, target, "{dir}: Service port and container port differ");
            }
        }

        // Ports equal the binary's defaults.
        assert_eq!(port_by_name(&r, "client"), defaults.client_port as i32, "{dir}: client port");
        assert_eq!(port_by_name(&r, "peer"), defaults.peer_port as i32, "{dir}: peer port");
        assert_eq!(port_by_name(&r, "ops"), defaults.ops_port as i32, "{dir}: ops port");

        // Probes use paths the ops server serves, on the ops port; readiness is /readyz.
        let c = r.container();
        for (what, probe) in [
            ("startup", &c.startup_probe),
            ("readiness", &c.readiness_probe),
            ("liveness", &c.liveness_probe),
        ] {
            let probe = probe.clone().unwrap_or_else(|| panic!("{dir}: {what} probe missing"));
            let get = probe.http_get.unwrap_or_else(|| panic!("{dir}: {what} probe is not an HTTP GET"));
            let path = get.path.unwrap_or_default();
            assert!(
                kvset_server::service::ops::PATHS.contains(&path.as_str()),
                "{dir}: {what} probe path {path} is not served"
            );
            assert_eq!(resolve_port(&r, &get.port), defaults.ops_port as i32, "{dir}: {what} probe port");
        }
        assert_eq!(
            c.readiness_probe.and_then(|p| p.http_get).and_then(|g| g.path).as_deref(),
            Some("/readyz")
        );

        // The data volume is mounted where the binary keeps its volume.
        let mounts: BTreeMap<String, String> =
            c.volume_mounts.clone().unwrap_or_default().into_iter().map(|m| (m.name, m.mount_path)).collect();
        let claim = spec.volume_claim_templates.clone().unwrap_or_default();
        assert_eq!(claim.len(), 1, "{dir}: one volumeClaimTemplate");
        let claim_name = claim[0].metadata.name.clone().expect("claim name");
        let data_dir = env(&r).get("KVSET_DATA_DIR").and_then(|e| e.value.clone());
        let data_dir = data_dir.unwrap_or_else(|| defaults.data_dir.display().to_string());
        assert_eq!(
            mounts.get(&claim_name),
            Some(&data_dir),
            "{dir}: the PVC must be mounted at the data dir"
        );
        let retention = spec.persistent_volume_claim_retention_policy.clone().expect("PVC retention policy");
        assert_eq!(
            retention.when_scaled.as_deref(),
            Some("Delete"),
            "{dir}: a scaled-down member must not come back"
        );

        // Environment: every KVSET_* variable is a real config key (or KVSET_CONFIG), the
        // downward API provides POD_NAME and POD_NAMESPACE.
        let env = env(&r);
        let known: BTreeSet<String> = kvset_server::Config::keys()
            .iter()
            .map(|k| env_var(k.key))
            .chain(["KVSET_CONFIG".to_string()])
            .collect();
        for name in env.keys().filter(|n| n.starts_with("KVSET_")) {
            assert!(known.contains(name), "{dir}: {name} is not read by the binary");
        }
        for (name, field) in [("POD_NAME", "metadata.name"), ("POD_NAMESPACE", "metadata.namespace")] {
            let from = env
                .get(name)
                .and_then(|e| e.value_from.clone())
                .and_then(|v| v.field_ref)
                .map(|f| f.field_path);
            assert_eq!(from.as_deref(), Some(field), "{dir}: {name} must come from the downward API");
        }
        let replicas = spec.replicas.expect("replicas");
        let initial =
            env.get("KVSET_INITIAL_REPLICAS").and_then(|e| e.value.clone()).expect("KVSET_INITIAL_REPLICAS");
        assert_eq!(initial, replicas.to_string(), "{dir}: initial replicas must equal spec.replicas");
        assert_eq!(
            env.get("KVSET_REPLICAS_SOURCE").and_then(|e| e.value.clone()).as_deref(),
            Some("kubernetes")
        );

        // The configuration file is mounted where KVSET_CONFIG points and is a valid config.
        let config_path = env.get("KVSET_CONFIG").and_then(|e| e.value.clone()).expect("KVSET_CONFIG");
        let (mount_dir, file) = config_path.rsplit_once('/').expect("an absolute path");
        let config_mount = mounts.iter().find(|(_, p)| p.as_str() == mount_dir).map(|(n, _)| n.clone());
        let config_mount = config_mount.unwrap_or_else(|| panic!("{dir}: nothing mounted at {mount_dir}"));
        let volume = pod
            .volumes
            .clone()
            .unwrap_or_default()
            .into_iter()
            .find(|v| v.name == config_mount)
            .expect("volume");
        let cm_name = volume.config_map.expect("a ConfigMap volume").name;
        let cm = r.config_map();
        assert_eq!(
            cm.metadata.name.as_deref(),
            Some(cm_name.as_str()),
            "{dir}: the mounted ConfigMap exists"
        );
        let toml = cm
            .data
            .unwrap_or_default()
            .get(file)
            .cloned()
            .unwrap_or_else(|| panic!("{dir}: ConfigMap lacks {file}"));
        let tmp = tempfile::NamedTempFile::new().expect("tmp");
        std::fs::write(tmp.path(), toml).expect("write");
        let loaded =
            Config::load(Some(tmp.path()), &BTreeMap::new(), &[]).expect("the ConfigMap is a valid config");
        assert_eq!(loaded, Config::default(), "{dir}: the shipped config is the reference config");

        // Shutdown fits in the grace period: wait-for-removal + drain/stop.
        let grace = pod.termination_grace_period_seconds.expect("terminationGracePeriodSeconds");
        let needed = (defaults.leave_timeout_ms + defaults.shutdown_timeout_ms) / 1000;
        assert!(grace as u64 > needed, "{dir}: grace period {grace}s must exceed {needed}s");

        // Security: non-root, read-only root filesystem, no escalation, no capabilities, seccomp.
        let psc = pod.security_context.clone().expect("pod securityContext");
        assert_eq!(psc.run_as_non_root, Some(true));
        assert_eq!(psc.run_as_user, Some(65532), "{dir}: the image's user");
        assert_eq!(psc.seccomp_profile.map(|s| s.type_), Some("RuntimeDefault".into()));
        let csc = c.security_context.clone().expect("container securityContext");
        assert_eq!(csc.read_only_root_filesystem, Some(true));
        assert_eq!(csc.allow_privilege_escalation, Some(false));
        assert_eq!(csc.capabilities.and_then(|c| c.drop), Some(vec!["ALL".to_string()]));

        // The PDB selects the pods and allows one at a time.
        let pdb = r.pdb().spec.expect("pdb spec");
        assert_eq!(pdb.max_unavailable, Some(IntOrString::Int(1)), "{dir}");
        for (k, v) in pdb.selector.and_then(|s| s.match_labels).unwrap_or_default() {
            assert_eq!(labels.get(&k), Some(&v), "{dir}: the PDB does not select the pods");
        }

        // RBAC: exactly get, list and watch on this one StatefulSet, bound to the pods'
        // ServiceAccount.
        let sa = pod.service_account_name.clone().expect("serviceAccountName");
        assert_eq!(r.service_account().metadata.name.as_deref(), Some(sa.as_str()));
        let rules = r.role().rules.unwrap_or_default();
        assert_eq!(rules.len(), 1, "{dir}: one rule");
        let rule = &rules[0];
        assert_eq!(rule.api_groups, Some(vec!["apps".to_string()]));
        assert_eq!(rule.resources, Some(vec!["statefulsets".to_string()]));
        assert_eq!(rule.resource_names, Some(vec![sts.metadata.name.clone().expect("name")]));
        assert_eq!(
            rule.verbs,
            vec!["get".to_string(), "list".to_string(), "watch".to_string()],
            "{dir}: what the replicas source calls"
        );
        let binding = r.role_binding();
        assert_eq!(binding.role_ref.name, r.role().metadata.name.expect("role name"));
        let subjects = binding.subjects.unwrap_or_default();
        assert!(
            subjects.iter().any(|s| s.kind == "ServiceAccount" && s.name == sa),
            "{dir}: binding subject"
        );

        // NetworkPolicy: the peer port only from kvset pods.
        let np = r.network_policy().spec.expect("np spec");
        for (k, v) in np.pod_selector.clone().and_then(|s| s.match_labels).unwrap_or_default() {
            assert_eq!(labels.get(&k), Some(&v), "{dir}: the NetworkPolicy does not select the pods");
        }
        for rule in np.ingress.unwrap_or_default() {
            let ports: Vec<i32> = rule
                .ports
                .unwrap_or_default()
                .iter()
                .filter_map(|p| p.port.as_ref().map(|p| resolve_port(&r, p)))
                .collect();
            if ports.contains(&(defaults.peer_port as i32)) {
                let from = rule.from.unwrap_or_default();
                assert!(!from.is_empty(), "{dir}: the peer port must not be open to everyone");
                for peer in from {
                    let sel = peer.pod_selector.and_then(|s| s.match_labels).unwrap_or_default();
                    assert!(
                        !sel.is_empty() && sel.iter().all(|(k, v)| labels.get(k) == Some(v)),
                        "{dir}: peer port from non-kvset pods"
                    );
                }
            }
        }
    }
}

/// The backups overlay's CronJob: it reaches the client Service on its client port, writes into
/// a mounted volume backed by a claim of the same rendering, runs the same image as the members
/// under the same restrictions, never overlaps itself, and keeps a bounded number of backups.
/// (`crates/kvset/tests/backup.rs` runs its exact command line against a live cluster.)
#[test]
fn the_backup_cronjob_reaches_the_cluster_and_writes_to_its_own_volume() {
    use k8s_openapi::api::batch::v1::CronJob;
    use k8s_openapi::api::core::v1::PersistentVolumeClaim;
    let r = render("deploy/k8s/overlays/backups").unwrap_or_else(|e| panic!("{e}"));
    let cron: CronJob = r.one("CronJob");
    let spec = cron.spec.expect("spec");
    assert_eq!(spec.concurrency_policy.as_deref(), Some("Forbid"), "backups must not overlap");
    let pod = spec.job_template.spec.expect("job spec").template.spec.expect("pod spec");
    assert_eq!(pod.security_context.as_ref().and_then(|s| s.run_as_non_root), Some(true));
    let container = &pod.containers[0];
    assert_eq!(container.image, r.container().image, "the same image as the members");
    let args = container.args.clone().expect("args");
    assert_eq!(&args[..2], ["snapshot", "save"]);
    let flag = |name: &str| args.iter().position(|a| a == name).map(|i| args[i + 1].clone());
    let dir = flag("--dir").expect("--dir");
    let keep: u32 = flag("--keep").expect("--keep").parse().expect("--keep is a number");
    assert!(keep >= 1);
    let mount = container
        .volume_mounts
        .clone()
        .unwrap_or_default()
        .into_iter()
        .find(|m| m.mount_path == dir)
        .unwrap_or_else(|| panic!("--dir {dir} is not a mounted volume"));
    let volume =
        pod.volumes.clone().unwrap_or_default().into_iter().find(|v| v.name == mount.name).expect("volume");
    let claim = volume.persistent_volume_claim.expect("the backups live on a claim").claim_name;
    let claims: Vec<PersistentVolumeClaim> = r.all("PersistentVolumeClaim");
    assert!(
        claims.iter().any(|c| c.metadata.name.as_deref() == Some(claim.as_str())),
        "claim {claim} missing"
    );
    // KVSET_ENDPOINTS names the client Service and the members' client port.
    let endpoints = container
        .env
        .clone()
        .unwrap_or_default()
        .into_iter()
        .find(|e| e.name == "KVSET_ENDPOINTS")
        .and_then(|e| e.value)
        .expect("KVSET_ENDPOINTS");
    let (host, port) = endpoints.split_once(':').expect("host:port");
    let service = r.service(host);
    let ports = service.spec.clone().expect("spec").ports.unwrap_or_default();
    assert!(
        ports.iter().any(|p| p.port.to_string() == port
            && resolve_port(&r, p.target_port.as_ref().unwrap()) == port_by_name(&r, "client")),
        "{endpoints}: not the client port of Service {host}"
    );
}

/// The TLS overlay: every member of the initial set has a cert-manager Certificate of its own,
/// issued by a CA Issuer whose CA is itself issued in the rendering, naming the DNS name the
/// members verify it by (`tls.member_dns_name` as the overlay sets it) and usable both ways;
/// the files the members are told to read are mounted from exactly those secrets, at the
/// paths their `{name}` resolves to; a client certificate exists; the base has no TLS.
#[test]
fn the_tls_overlay_gives_every_member_a_certificate_of_its_own_mounted_where_it_reads_it() {
    use serde_json::Value;
    let r = render("deploy/k8s/overlays/tls").unwrap_or_else(|e| panic!("{e}"));
    let certificates: Vec<Value> = r.all("Certificate");
    let issuers: Vec<Value> = r.all("Issuer");
    let named = |list: &[Value], name: &str| -> Value {
        list.iter()
            .find(|o| o["metadata"]["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("no object named {name}"))
    };
    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .map(|a| a.iter().filter_map(|s| s.as_str().map(str::to_string)).collect())
            .unwrap_or_default()
    };
    // Issuer chain: member certificates -> CA issuer -> CA certificate -> self-signed issuer.
    let issuer_of = |cert: &Value| -> Value {
        assert_eq!(cert["spec"]["issuerRef"]["kind"], "Issuer", "{cert}");
        named(&issuers, cert["spec"]["issuerRef"]["name"].as_str().expect("issuerRef.name"))
    };

    let vars = env(&r);
    let value =
        |name: &str| vars.get(name).and_then(|e| e.value.clone()).unwrap_or_else(|| panic!("{name} unset"));
    for key in ["KVSET_TLS_CERT_FILE", "KVSET_TLS_KEY_FILE", "KVSET_TLS_CA_FILE", "KVSET_TLS_MEMBER_DNS_NAME"]
    {
        assert!(
            kvset_server::Config::keys().iter().any(|k| env_var(k.key) == key),
            "{key} is not a configuration key"
        );
    }
    assert_eq!(value("KVSET_TLS_CLIENT_CERT_AUTH"), "true");
    let sts = r.statefulset();
    let spec = sts.spec.clone().expect("spec");
    let service = spec.service_name.clone().expect("serviceName");
    let pod = spec.template.spec.clone().expect("pod spec");
    let replicas = spec.replicas.expect("replicas") as u32;
    let mounts = r.container().volume_mounts.unwrap_or_default();

    for ordinal in 0..replicas {
        let member = format!("kvset-{ordinal}");
        // Its certificate: its own secret, its verification name, both usages, the CA chain.
        let cert = certificates
            .iter()
            .find(|c| c["spec"]["secretName"] == format!("{member}-tls"))
            .unwrap_or_else(|| panic!("no Certificate for {member}"));
        let dns = strings(&cert["spec"]["dnsNames"]);
        let verified_as = value("KVSET_TLS_MEMBER_DNS_NAME")
            .replace("{set}", "kvset")
            .replace("{ordinal}", &ordinal.to_string())
            .replace("{service}", &service);
        assert!(dns.contains(&verified_as), "{member}: its certificate must name {verified_as}: {dns:?}");
        assert!(
            dns.iter().any(|d| d == "kvset" || d.starts_with("kvset.")),
            "{member}: the client Service name"
        );
        let usages = strings(&cert["spec"]["usages"]);
        for usage in ["server auth", "client auth"] {
            assert!(usages.iter().any(|u| u == usage), "{member}: usage {usage} missing: {usages:?}");
        }
        let ca_issuer = issuer_of(cert);
        let ca_secret = ca_issuer["spec"]["ca"]["secretName"].as_str().expect("a CA issuer");
        let ca_cert =
            certificates.iter().find(|c| c["spec"]["secretName"] == ca_secret).expect("the CA certificate");
        assert_eq!(ca_cert["spec"]["isCA"], true);
        assert!(issuer_of(ca_cert)["spec"].get("selfSigned").is_some(), "the CA is bootstrapped self-signed");

        // The files this member reads are that secret's keys, mounted where `{name}` points.
        for (variable, key) in [
            ("KVSET_TLS_CERT_FILE", "tls.crt"),
            ("KVSET_TLS_KEY_FILE", "tls.key"),
            ("KVSET_TLS_CA_FILE", "ca.crt"),
        ] {
            let file = value(variable).replace("{name}", &member);
            let mount = mounts
                .iter()
                .find(|m| file.starts_with(&format!("{}/", m.mount_path)))
                .unwrap_or_else(|| panic!("{variable} = {file} is not under a mounted volume"));
            assert_eq!(mount.read_only, Some(true), "the TLS volume is mounted read-only");
            let rel = &file[mount.mount_path.len() + 1..];
            let volume = pod
                .volumes
                .clone()
                .unwrap_or_default()
                .into_iter()
                .find(|v| v.name == mount.name)
                .expect("volume");
            let projected = volume.projected.expect("a projected volume of the members' secrets");
            let from =
                projected.sources.unwrap_or_default().into_iter().filter_map(|s| s.secret).find(|s| {
                    s.items.clone().unwrap_or_default().iter().any(|i| i.path == rel && i.key == key)
                });
            let secret = from.unwrap_or_else(|| panic!("{member}: nothing mounts {key} at {file}"));
            assert_eq!(secret.name, format!("{member}-tls"), "{member} reads its own secret");
        }
    }
    let client = named(&certificates, "kvset-client-root");
    assert!(strings(&client["spec"]["usages"]).iter().any(|u| u == "client auth"));
    assert_eq!(client["spec"]["commonName"], "root");

    // The base and the other overlays run without TLS (no cert-manager needed).
    let base = render("deploy/k8s").unwrap_or_else(|e| panic!("{e}"));
    assert!(!env(&base).contains_key("KVSET_TLS_CERT_FILE"));
    assert!(base.all::<Value>("Certificate").is_empty());
}
