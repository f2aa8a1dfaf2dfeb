//! The Kubernetes manifests as rendered by `kubectl kustomize`, parsed into `k8s-openapi` types.
//! Used by the invariant test and by the StatefulSet emulator of the chaos suite, so both look
//! at exactly what a user applies.

use std::path::Path;
use std::path::PathBuf;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::api::core::v1::Container;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::Role;
use k8s_openapi::api::rbac::v1::RoleBinding;
use serde::de::DeserializeOwned;

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ has a parent").to_path_buf()
}

/// Every object of one rendered kustomization.
#[derive(Debug, Clone)]
pub struct Rendered {
    /// The kustomization directory, relative to the repository root.
    pub dir: String,
    /// The objects, as JSON.
    pub objects: Vec<serde_json::Value>,
}

/// Renders `dir` (relative to the repository root) with `kubectl kustomize`.
pub fn render(dir: &str) -> Result<Rendered, String> {
    let path = repo_root().join(dir);
    let out = std::process::Command::new("kubectl")
        .arg("kustomize")
        .arg(&path)
        .output()
        .map_err(|e| format!("cannot run `kubectl kustomize` (is kubectl installed?): {e}"))?;
    if !out.status.success() {
        return Err(format!("kubectl kustomize {dir} failed: {}", String::from_utf8_lossy(&out.stderr)));
    }
    let text = String::from_utf8(out.stdout).map_err(|e| e.to_string())?;
    parse(dir, &text)
}

/// Parses multi-document YAML.
pub fn parse(dir: &str, yaml: &str) -> Result<Rendered, String> {
    let objects: Vec<serde_json::Value> =
        serde_saphyr::from_multiple(yaml).map_err(|e| format!("{dir}: invalid YAML: {e}"))?;
    Ok(Rendered { dir: dir.to_string(), objects: objects.into_iter().filter(|o| !o.is_null()).collect() })
}

impl Rendered {
    /// Every object of `kind`, decoded.
    pub fn all<T: DeserializeOwned>(&self, kind: &str) -> Vec<T> {
        self.objects
            .iter()
            .filter(|o| o.get("kind").and_then(|k| k.as_str()) == Some(kind))
            .map(|o| {
                serde_json::from_value(o.clone())
                    .unwrap_or_else(|e| panic!("{}: {kind} does not decode: {e}", self.dir))
            })
            .collect()
    }

    /// The one object of `kind`.
    pub fn one<T: DeserializeOwned>(&self, kind: &str) -> T {
        let mut all = self.all::<T>(kind);
        assert_eq!(all.len(), 1, "{}: expected exactly one {kind}", self.dir);
        all.remove(0)
    }

    pub fn statefulset(&self) -> StatefulSet {
        self.one("StatefulSet")
    }

    pub fn services(&self) -> Vec<Service> {
        self.all("Service")
    }

    /// The Service named `name`.
    pub fn service(&self, name: &str) -> Service {
        self.services()
            .into_iter()
            .find(|s| s.metadata.name.as_deref() == Some(name))
            .unwrap_or_else(|| panic!("{}: no Service {name}", self.dir))
    }

    pub fn pdb(&self) -> PodDisruptionBudget {
        self.one("PodDisruptionBudget")
    }

    pub fn role(&self) -> Role {
        self.one("Role")
    }

    pub fn role_binding(&self) -> RoleBinding {
        self.one("RoleBinding")
    }

    pub fn service_account(&self) -> ServiceAccount {
        self.one("ServiceAccount")
    }

    pub fn network_policy(&self) -> NetworkPolicy {
        self.one("NetworkPolicy")
    }

    pub fn config_map(&self) -> ConfigMap {
        self.one("ConfigMap")
    }

    /// The kvset container of the StatefulSet's pod template.
    pub fn container(&self) -> Container {
        let sts = self.statefulset();
        let spec = sts.spec.expect("spec").template.spec.expect("pod spec");
        spec.containers.into_iter().find(|c| c.name == "kvset").expect("a container named kvset")
    }
}
