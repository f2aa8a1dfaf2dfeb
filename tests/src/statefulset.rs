//! A StatefulSet emulator on Docker: it reads the rendered `deploy/k8s` StatefulSet and Services
//! and runs them the way the StatefulSet controller and the kubelet would.
//!
//! * Pods are containers named `<set>-<N>` (testcontainers, from the locally built image), with
//!   hostname `<set>-<N>`, the manifest's args, environment (downward-API values filled in:
//!   `metadata.name`, `metadata.namespace`), security context (user, read-only root filesystem,
//!   dropped capabilities, no privilege escalation) and volume mounts: one named Docker volume
//!   per ordinal for the volumeClaimTemplate (the PVC), the ConfigMap as a read-only directory.
//! * Two networks per run: a *control* network the harness uses to reach pods, and a *raft*
//!   network on which each pod has the DNS aliases `<set>-<N>.<headless-service>` and
//!   `<set>-<N>.<headless-service>.<namespace>.svc.cluster.local`. Partitions cut only the
//!   raft network, so the harness keeps its view. (testcontainers cannot set aliases or
//!   disconnect networks: those calls use its re-exported bollard.)
//! * The Kubernetes API is the stub of [`crate::k8s_stub`], reachable from the pods on the
//!   control network's gateway; scaling changes its `spec.replicas` like `kubectl scale`.
//! * Readiness is polled from the manifest's readiness probe.
//! * Pod management follows the manifest (`Parallel`: pods are created together).
//! * Everything is labelled with the run id and removed at the end, also when a test panics
//!   (see [`Emulator::drop`]).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::RwLock;
use std::time::Duration;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::Container;
use testcontainers::bollard::models::EndpointSettings;
use testcontainers::bollard::models::NetworkConnectRequest;
use testcontainers::bollard::models::NetworkCreateRequest;
use testcontainers::bollard::models::NetworkDisconnectRequest;
use testcontainers::bollard::query_parameters::KillContainerOptions;
use testcontainers::bollard::query_parameters::StopContainerOptions;
use testcontainers::bollard::Docker;
use testcontainers::core::AccessMode;
use testcontainers::core::Mount;
use testcontainers::runners::AsyncRunner;
use testcontainers::ContainerAsync;
use testcontainers::GenericImage;
use testcontainers::ImageExt;

use crate::harness::Endpoints;
use crate::harness::Harness;
use crate::k8s_stub::K8sStub;
use crate::manifests::Rendered;

/// Label on every Docker object a run creates.
pub const LABEL: &str = "kvset-chaos";

/// A running pod.
struct Pod {
    container: ContainerAsync<GenericImage>,
    /// The pod's address on the control network.
    ip: String,
}

/// Plays cert-manager and the kubelet for a rendering with cert-manager `Certificate`s: one CA
/// (the `isCA` Certificate), every other Certificate issued by it with its names, each
/// projected Secret item of the pod's volumes written where the kubelet would put it. Returns
/// those volume directories and, when a client certificate (`client auth` only) exists, the
/// client TLS the harness uses, verifying a name every member certificate carries (the client
/// Service's). Nothing for a rendering without Certificates.
#[allow(clippy::type_complexity)]
fn cert_manager(
    rendered: &Rendered,
    pod: &k8s_openapi::api::core::v1::PodSpec,
) -> Result<(BTreeMap<String, tempfile::TempDir>, Option<(Arc<kvset_client::ClientTls>, String)>), String> {
    use kvset_server::devcerts::Authority;
    use kvset_server::devcerts::Issued;
    use kvset_server::devcerts::Request;
    use serde_json::Value;
    let certificates: Vec<Value> = rendered.all("Certificate");
    if certificates.is_empty() {
        return Ok((BTreeMap::new(), None));
    }
    let ca = Authority::new("chaos cert-manager CA").map_err(err)?;
    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .map(|a| a.iter().filter_map(|s| s.as_str().map(str::to_string)).collect())
            .unwrap_or_default()
    };
    let mut secrets: BTreeMap<String, (Issued, Vec<String>)> = BTreeMap::new();
    for c in certificates.iter().filter(|c| c["spec"]["isCA"] != true) {
        let spec = &c["spec"];
        let request = Request::named(
            spec["commonName"].as_str().unwrap_or_default(),
            strings(&spec["dnsNames"]),
            strings(&spec["ipAddresses"]).iter().filter_map(|ip| ip.parse().ok()).collect(),
        );
        let secret = spec["secretName"].as_str().ok_or("a Certificate without secretName")?.to_string();
        secrets.insert(secret, (ca.issue(&request).map_err(err)?, strings(&spec["usages"])));
    }
    let mut dirs = BTreeMap::new();
    for volume in pod.volumes.clone().unwrap_or_default() {
        let Some(projected) = volume.projected else { continue };
        let dir = tempfile::tempdir().map_err(err)?;
        for source in projected.sources.unwrap_or_default().into_iter().filter_map(|s| s.secret) {
            let Some((issued, _)) = secrets.get(&source.name) else {
                if source.optional == Some(true) {
                    continue;
                }
                return Err(format!("volume {}: no Certificate makes secret {}", volume.name, source.name));
            };
            for item in source.items.unwrap_or_default() {
                let text = match item.key.as_str() {
                    "tls.crt" => issued.cert_pem.clone(),
                    "tls.key" => issued.key_pem.clone(),
                    "ca.crt" => ca.cert_pem(),
                    other => return Err(format!("secret {}: no key {other}", source.name)),
                };
                let path = dir.path().join(&item.path);
                std::fs::create_dir_all(path.parent().ok_or("an item path without a directory")?)
                    .map_err(err)?;
                std::fs::write(&path, text).map_err(err)?;
            }
        }
        // The container runs as a non-root user (the kubelet would set the group via fsGroup).
        let _ = std::process::Command::new("chmod").args(["-R", "a+rX"]).arg(dir.path()).status();
        dirs.insert(volume.name.clone(), dir);
    }
    let client = secrets.values().find(|(_, usages)| usages.iter().all(|u| u != "server auth"));
    let tls = match client {
        None => None,
        Some((issued, _)) => {
            let roots = kvset_proto::tls::parse_roots(std::path::Path::new("CA"), ca.cert_pem().as_bytes())
                .map_err(err)?;
            let path = std::path::Path::new("client certificate");
            let identity = kvset_proto::tls::parse_identity(
                (path, issued.cert_pem.as_bytes()),
                (path, issued.key_pem.as_bytes()),
            )
            .map_err(err)?;
            let config = kvset_proto::tls::client_config(roots, Some(identity)).map_err(err)?;
            // The client Service's name: in every member (server) certificate.
            let services: Vec<String> =
                rendered.services().iter().filter_map(|s| s.metadata.name.clone()).collect();
            let name = services
                .into_iter()
                .find(|n| {
                    certificates
                        .iter()
                        .filter(|c| strings(&c["spec"]["usages"]).iter().any(|u| u == "server auth"))
                        .all(|c| strings(&c["spec"]["dnsNames"]).contains(n))
                })
                .ok_or("no Service name is in every member certificate")?;
            Some((kvset_proto::tls::ClientTls::new(config), name))
        }
    };
    Ok((dirs, tls))
}

/// Runs one StatefulSet on Docker.
pub struct Emulator {
    pub docker: Docker,
    pub run: String,
    pub set: String,
    pub headless: String,
    pub namespace: String,
    container: Container,
    readiness_path: String,
    ops_port: u16,
    client_port: u16,
    control_net: String,
    raft_net: String,
    config_dir: tempfile::TempDir,
    /// Other mounted volumes (projected Secrets), by volume name, as the kubelet lays them out.
    volume_dirs: BTreeMap<String, tempfile::TempDir>,
    pub stub: K8sStub,
    pods: BTreeMap<u32, Pod>,
    pub replicas: u32,
    image: (String, String),
    pub endpoints: Arc<RwLock<Endpoints>>,
    grace: Duration,
    /// The configuration the members run with (from the ConfigMap and the manifest's env).
    member_config: kvset_server::Config,
}

impl std::fmt::Debug for Emulator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Emulator")
            .field("run", &self.run)
            .field("pods", &self.pods.keys())
            .finish_non_exhaustive()
    }
}

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

fn port_named(c: &Container, name: &str) -> u16 {
    c.ports
        .clone()
        .unwrap_or_default()
        .into_iter()
        .find(|p| p.name.as_deref() == Some(name))
        .map_or(0, |p| p.container_port as u16)
}

impl Emulator {
    /// Prepares a run of the StatefulSet in `rendered` (nothing is started yet).
    pub async fn new(docker: Docker, rendered: &Rendered, image: &str) -> Result<Self, String> {
        let sts: StatefulSet = rendered.statefulset();
        let spec = sts.spec.clone().ok_or("no spec")?;
        let set = sts.metadata.name.clone().ok_or("no name")?;
        let headless = spec.service_name.clone().ok_or("no serviceName")?;
        let replicas = spec.replicas.unwrap_or(1) as u32;
        let container = rendered.container();
        let pod = spec.template.spec.clone().ok_or("no pod spec")?;
        let readiness_path = container
            .readiness_probe
            .clone()
            .and_then(|p| p.http_get)
            .and_then(|g| g.path)
            .ok_or("the readiness probe is not an HTTP GET")?;
        let grace = Duration::from_secs(pod.termination_grace_period_seconds.unwrap_or(30) as u64);
        let run = format!("{}", std::process::id());
        let namespace = "chaos".to_string();
        let (name, tag) = image.split_once(':').unwrap_or((image, "latest"));

        cleanup_blocking(None);
        let control_net = format!("{LABEL}-control");
        let raft_net = format!("{LABEL}-raft");
        for net in [&control_net, &raft_net] {
            docker
                .create_network(NetworkCreateRequest {
                    name: net.clone(),
                    driver: Some("bridge".into()),
                    labels: Some([(LABEL.to_string(), run.clone())].into()),
                    ..Default::default()
                })
                .await
                .map_err(|e| format!("create network {net}: {e}"))?;
        }
        let gateway = docker
            .inspect_network(
                &control_net,
                None::<testcontainers::bollard::query_parameters::InspectNetworkOptions>,
            )
            .await
            .map_err(err)?
            .ipam
            .and_then(|i| i.config)
            .and_then(|c| c.into_iter().find_map(|c| c.gateway))
            .ok_or("the control network has no gateway")?;
        let stub = K8sStub::start_on(&gateway, &namespace, &set, replicas as i32).await;

        // The ConfigMap, as the kubelet would project it.
        let config_dir = tempfile::tempdir().map_err(err)?;
        let cm = rendered.config_map();
        for (file, text) in cm.data.unwrap_or_default() {
            std::fs::write(config_dir.path().join(file), text).map_err(err)?;
        }
        // The container runs as a non-root user: the files must be readable by it.
        let _ = std::process::Command::new("chmod").args(["-R", "a+rX"]).arg(config_dir.path()).status();
        // The members' effective configuration: the ConfigMap's file, then the literal env.
        let file = std::fs::read_dir(config_dir.path())
            .map_err(err)?
            .flatten()
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|x| x == "toml"));
        let env: BTreeMap<String, String> = container
            .env
            .clone()
            .unwrap_or_default()
            .into_iter()
            .filter_map(|e| e.value.map(|v| (e.name, v)))
            .collect();
        let member_config = kvset_server::Config::load(file.as_deref(), &env, &[]).map_err(err)?;
        let (volume_dirs, tls) = cert_manager(rendered, &pod)?;
        let endpoints = Arc::new(RwLock::new(Endpoints { tls, ..Default::default() }));

        Ok(Self {
            docker,
            run,
            set,
            headless,
            namespace,
            ops_port: port_named(&container, "ops"),
            client_port: port_named(&container, "client"),
            container,
            readiness_path,
            control_net,
            raft_net,
            config_dir,
            volume_dirs,
            stub,
            pods: BTreeMap::new(),
            replicas,
            image: (name.to_string(), tag.to_string()),
            endpoints,
            grace,
            member_config,
        })
    }

    /// The name of an ordinal's pod.
    pub fn pod_name(&self, ordinal: u32) -> String {
        format!("{}-{ordinal}", self.set)
    }

    /// The Docker volume standing for an ordinal's PVC.
    pub fn volume_name(&self, ordinal: u32) -> String {
        format!("{LABEL}-data-{}", self.pod_name(ordinal))
    }

    fn aliases(&self, ordinal: u32) -> Vec<String> {
        let pod = self.pod_name(ordinal);
        vec![
            format!("{pod}.{}", self.headless),
            format!("{pod}.{}.{}", self.headless, self.namespace),
            format!("{pod}.{}.{}.svc.cluster.local", self.headless, self.namespace),
        ]
    }

    /// Ordinals with a running pod.
    pub fn running(&self) -> Vec<u32> {
        self.pods.keys().copied().collect()
    }

    /// The client endpoint of an ordinal's pod (control network).
    pub fn client_endpoint(&self, ordinal: u32) -> Option<String> {
        self.pods.get(&ordinal).map(|p| format!("{}:{}", p.ip, self.client_port))
    }

    fn publish_endpoints(&self) {
        let mut e = self.endpoints.write().unwrap_or_else(|e| e.into_inner());
        e.version += 1;
        e.client = self.pods.iter().map(|(o, p)| (*o, format!("{}:{}", p.ip, self.client_port))).collect();
    }

    /// Creates an ordinal's pod (its volume is created on first use and then reused).
    pub async fn start_pod(&mut self, ordinal: u32) -> Result<(), String> {
        let name = self.pod_name(ordinal);
        let mut req = GenericImage::new(self.image.0.clone(), self.image.1.clone())
            .with_container_name(&name)
            .with_hostname(&name)
            .with_network(&self.control_net)
            .with_label(LABEL, &self.run)
            .with_startup_timeout(Duration::from_secs(60));
        if let Some(args) = &self.container.args {
            req = req.with_cmd(args.clone());
        }
        for env in self.container.env.clone().unwrap_or_default() {
            let value = match (&env.value, &env.value_from) {
                (Some(v), _) => v.clone(),
                (None, Some(from)) => match from.field_ref.as_ref().map(|f| f.field_path.as_str()) {
                    Some("metadata.name") => name.clone(),
                    Some("metadata.namespace") => self.namespace.clone(),
                    other => return Err(format!("unsupported valueFrom {other:?} for {}", env.name)),
                },
                (None, None) => String::new(),
            };
            req = req.with_env_var(env.name.clone(), value);
        }
        // The cluster's API server: the stub, on the control network's gateway.
        req = req.with_env_var("KVSET_KUBERNETES_API_URL", self.stub.url.clone());
        for m in self.container.volume_mounts.clone().unwrap_or_default() {
            if m.name == "data" {
                req = req.with_mount(Mount::volume_mount(self.volume_name(ordinal), m.mount_path.clone()));
            } else if let Some(dir) = self.volume_dirs.get(&m.name) {
                let dir = dir.path().display().to_string();
                req = req.with_mount(
                    Mount::bind_mount(dir, m.mount_path.clone()).with_access_mode(AccessMode::ReadOnly),
                );
            } else {
                let dir = self.config_dir.path().display().to_string();
                req = req.with_mount(
                    Mount::bind_mount(dir, m.mount_path.clone()).with_access_mode(AccessMode::ReadOnly),
                );
            }
        }
        if let Some(sc) = &self.container.security_context {
            if sc.read_only_root_filesystem == Some(true) {
                req = req.with_readonly_rootfs(true);
            }
            if sc.allow_privilege_escalation == Some(false) {
                req = req.with_security_opt("no-new-privileges");
            }
            for cap in sc.capabilities.clone().and_then(|c| c.drop).unwrap_or_default() {
                req = req.with_cap_drop(cap);
            }
        }
        req = req.with_user("65532:65532");
        // No published ports: the harness reaches pods on the control network.
        req = req.with_host_config_modifier(|hc| hc.publish_all_ports = Some(false));
        // The volume, labelled, before the container mounts it.
        self.docker
            .create_volume(testcontainers::bollard::models::VolumeCreateRequest {
                name: Some(self.volume_name(ordinal)),
                labels: Some([(LABEL.to_string(), self.run.clone())].into()),
                ..Default::default()
            })
            .await
            .map_err(|e| format!("create volume {}: {e}", self.volume_name(ordinal)))?;
        let container = req.start().await.map_err(|e| format!("start {name}: {e}"))?;
        let id = container.id().to_string();
        self.connect_raft(&id, ordinal).await.map_err(|e| format!("{name}: {e}"))?;
        let ip = self.control_ip(&id).await?;
        self.pods.insert(ordinal, Pod { container, ip });
        self.publish_endpoints();
        Ok(())
    }

    async fn control_ip(&self, id: &str) -> Result<String, String> {
        let info = self
            .docker
            .inspect_container(id, None::<testcontainers::bollard::query_parameters::InspectContainerOptions>)
            .await
            .map_err(err)?;
        info.network_settings
            .and_then(|n| n.networks)
            .and_then(|n| n.get(&self.control_net).and_then(|e| e.ip_address.clone()))
            .filter(|ip| !ip.is_empty())
            .ok_or_else(|| format!("{id} has no address on the control network"))
    }

    /// Polls the readiness probe of an ordinal's pod until it answers 200.
    pub async fn wait_ready(&self, ordinal: u32, timeout: Duration) -> Result<(), String> {
        let ip = self.pods.get(&ordinal).map(|p| p.ip.clone()).ok_or("pod not running")?;
        let addr = format!("{ip}:{}", self.ops_port);
        crate::poll_until(&format!("{} ready", self.pod_name(ordinal)), timeout, || async {
            let reply = crate::http_get(&addr, &self.readiness_path).await.ok()?;
            reply.starts_with("HTTP/1.1 200").then_some(())
        })
        .await
    }

    /// Creates the pods of ordinals `0..n` together (Parallel pod management) and waits until
    /// each is ready.
    pub async fn start_all(&mut self, n: u32) -> Result<(), String> {
        for o in 0..n {
            if !self.pods.contains_key(&o) {
                self.start_pod(o).await?;
            }
        }
        for o in 0..n {
            self.wait_ready(o, Duration::from_secs(60)).await?;
        }
        Ok(())
    }

    /// `kill -9` of an ordinal's process; the pod object is gone (it must be rescheduled).
    pub async fn kill(&mut self, ordinal: u32) -> Result<(), String> {
        let name = self.pod_name(ordinal);
        let pod = self.pods.remove(&ordinal).ok_or_else(|| format!("{name} is not running"))?;
        self.docker
            .kill_container(&name, Some(KillContainerOptions { signal: "SIGKILL".into() }))
            .await
            .map_err(|e| format!("kill {name}: {e}"))?;
        pod.container.rm().await.map_err(|e| format!("remove {name}: {e}"))?;
        self.publish_endpoints();
        Ok(())
    }

    /// `kill -9` of several pods at the same instant (a power loss), then their removal.
    pub async fn kill_many(&mut self, ordinals: &[u32]) -> Result<(), String> {
        let names: Vec<String> = ordinals.iter().map(|o| self.pod_name(*o)).collect();
        let kills = names.iter().map(|name| {
            self.docker.kill_container(name, Some(KillContainerOptions { signal: "SIGKILL".into() }))
        });
        for (name, r) in names.iter().zip(futures::future::join_all(kills).await) {
            r.map_err(|e| format!("kill {name}: {e}"))?;
        }
        for o in ordinals {
            if let Some(pod) = self.pods.remove(o) {
                pod.container.rm().await.map_err(|e| format!("remove kvset-{o}: {e}"))?;
            }
        }
        self.publish_endpoints();
        Ok(())
    }

    /// Deletes an ordinal's pod as `kubectl delete pod` does: SIGTERM, then SIGKILL after the
    /// manifest's grace period.
    pub async fn delete_pod(&mut self, ordinal: u32) -> Result<(), String> {
        let name = self.pod_name(ordinal);
        let pod = self.pods.remove(&ordinal).ok_or_else(|| format!("{name} is not running"))?;
        self.publish_endpoints();
        let t = self.grace.as_secs() as i32;
        self.docker
            .stop_container(&name, Some(StopContainerOptions { t: Some(t), signal: None }))
            .await
            .map_err(|e| format!("stop {name}: {e}"))?;
        let exit = pod.container.exit_code().await.ok().flatten();
        pod.container.rm().await.map_err(|e| format!("remove {name}: {e}"))?;
        match exit {
            Some(0) => Ok(()),
            other => Err(format!("{name} did not exit cleanly after SIGTERM (exit code {other:?})")),
        }
    }

    /// Deletes several pods at once (a scale-down or a full stop with Parallel management).
    pub async fn delete_pods(&mut self, ordinals: &[u32]) -> Result<(), String> {
        let t = self.grace.as_secs() as i32;
        let mut pods = Vec::new();
        for o in ordinals {
            if let Some(p) = self.pods.remove(o) {
                pods.push((self.pod_name(*o), p));
            }
        }
        self.publish_endpoints();
        let stops = pods.into_iter().map(|(name, pod)| {
            let docker = self.docker.clone();
            async move {
                docker
                    .stop_container(&name, Some(StopContainerOptions { t: Some(t), signal: None }))
                    .await
                    .map_err(|e| format!("stop {name}: {e}"))?;
                let exit = pod.container.exit_code().await.ok().flatten();
                pod.container.rm().await.map_err(|e| format!("remove {name}: {e}"))?;
                if exit != Some(0) {
                    return Err(format!("{name} did not exit cleanly after SIGTERM (exit code {exit:?})"));
                }
                Ok(())
            }
        });
        for r in futures::future::join_all(stops).await {
            r?;
        }
        Ok(())
    }

    /// Deletes an ordinal's volume (its pod must be gone): the PVC is lost.
    pub async fn delete_volume(&mut self, ordinal: u32) -> Result<(), String> {
        let name = self.volume_name(ordinal);
        self.docker
            .remove_volume(&name, None::<testcontainers::bollard::query_parameters::RemoveVolumeOptions>)
            .await
            .map_err(|e| format!("remove volume {name}: {e}"))
    }

    /// Cuts an ordinal's pod off the raft network (it stays reachable for the harness).
    pub async fn partition(&self, ordinal: u32) -> Result<(), String> {
        let pod = self.pods.get(&ordinal).ok_or("pod not running")?;
        self.docker
            .disconnect_network(
                &self.raft_net,
                NetworkDisconnectRequest { container: pod.container.id().to_string(), force: Some(true) },
            )
            .await
            .map_err(|e| format!("disconnect: {e}"))
    }

    /// Reconnects an ordinal's pod to the raft network, with its aliases.
    pub async fn heal(&self, ordinal: u32) -> Result<(), String> {
        let pod = self.pods.get(&ordinal).ok_or("pod not running")?;
        self.connect_raft(pod.container.id(), ordinal).await
    }

    /// Connects a container to the raft network under the ordinal's DNS aliases.
    async fn connect_raft(&self, container: &str, ordinal: u32) -> Result<(), String> {
        self.docker
            .connect_network(
                &self.raft_net,
                NetworkConnectRequest {
                    container: container.to_string(),
                    endpoint_config: Some(EndpointSettings {
                        aliases: Some(self.aliases(ordinal)),
                        ..Default::default()
                    }),
                },
            )
            .await
            .map_err(|e| format!("connect to the raft network: {e}"))
    }

    /// `kubectl scale --replicas=n`: the API object changes, then the controller creates the
    /// missing pods together, or deletes the extra ones together and (whenScaled: Delete)
    /// their volumes.
    pub async fn scale(&mut self, n: u32) -> Result<(), String> {
        self.stub.scale(n as i32);
        if n > self.replicas {
            self.replicas = n;
            self.start_all(n).await
        } else {
            let extra: Vec<u32> = (n..self.replicas).collect();
            self.replicas = n;
            self.delete_pods(&extra).await?;
            for o in extra {
                self.delete_volume(o).await?;
            }
            Ok(())
        }
    }

    /// Removes everything this run created.
    pub async fn teardown(mut self) {
        for (_, pod) in std::mem::take(&mut self.pods) {
            let _ = pod.container.rm().await;
        }
        cleanup_blocking(Some(&self.run));
    }
}

impl Drop for Emulator {
    /// Best-effort removal of every container, network and volume of this run, also when a
    /// test panicked (through the docker CLI: no async runtime is needed here).
    fn drop(&mut self) {
        cleanup_blocking(Some(&self.run));
    }
}

/// Removes the Docker objects labelled for chaos runs (of `run`, or of any run).
pub fn cleanup_blocking(run: Option<&str>) {
    let filter = match run {
        Some(r) => format!("label={LABEL}={r}"),
        None => format!("label={LABEL}"),
    };
    // Straight to the engine socket, not through the testcontainers shim of `DOCKER_HOST`.
    let docker = || {
        let mut c = std::process::Command::new("docker");
        c.env("DOCKER_HOST", "unix:///var/run/docker.sock");
        c
    };
    let ids = |args: &[&str]| -> Vec<String> {
        docker()
            .args(args)
            .args(["--filter", &filter])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).split_whitespace().map(str::to_string).collect())
            .unwrap_or_default()
    };
    let containers = ids(&["ps", "-aq"]);
    if !containers.is_empty() {
        let _ = docker().args(["rm", "-f"]).args(&containers).output();
    }
    let networks = ids(&["network", "ls", "-q"]);
    if !networks.is_empty() {
        let _ = docker().args(["network", "rm"]).args(&networks).output();
    }
    let volumes = ids(&["volume", "ls", "-q"]);
    if !volumes.is_empty() {
        let _ = docker().args(["volume", "rm", "-f"]).args(&volumes).output();
    }
}

impl Harness for Emulator {
    fn kind(&self) -> &'static str {
        "docker"
    }

    fn member_config(&self) -> kvset_server::Config {
        self.member_config.clone()
    }

    fn running(&self) -> Vec<u32> {
        Emulator::running(self)
    }

    fn replicas(&self) -> u32 {
        self.replicas
    }

    fn endpoints(&self) -> Arc<RwLock<Endpoints>> {
        self.endpoints.clone()
    }

    async fn start_all(&mut self, n: u32) -> Result<(), String> {
        Emulator::start_all(self, n).await
    }

    async fn start(&mut self, ordinal: u32) -> Result<(), String> {
        self.start_pod(ordinal).await?;
        self.wait_ready(ordinal, Duration::from_secs(60)).await
    }

    async fn stop(&mut self, ordinal: u32) -> Result<(), String> {
        self.delete_pod(ordinal).await
    }

    async fn kill(&mut self, ordinals: &[u32]) -> Result<(), String> {
        self.kill_many(ordinals).await
    }

    async fn wipe(&mut self, ordinal: u32) -> Result<(), String> {
        self.delete_volume(ordinal).await
    }

    async fn partition(&mut self, ordinal: u32) -> Result<(), String> {
        Emulator::partition(self, ordinal).await
    }

    async fn heal(&mut self, ordinal: u32) -> Result<(), String> {
        Emulator::heal(self, ordinal).await
    }

    async fn scale(&mut self, n: u32) -> Result<(), String> {
        Emulator::scale(self, n).await
    }

    fn set_env(&mut self, name: &str, value: Option<&str>) {
        let env = self.container.env.get_or_insert_with(Vec::new);
        env.retain(|e| e.name != name);
        if let Some(v) = value {
            env.push(k8s_openapi::api::core::v1::EnvVar {
                name: name.to_string(),
                value: Some(v.to_string()),
                value_from: None,
            });
        }
    }
}
