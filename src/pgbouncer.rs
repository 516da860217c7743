//! PLACEHOLDER until the admin-console module lands (replaced by the pgb branch).
use std::path::{Path, PathBuf};
use std::time::Duration;

#[allow(missing_docs)]
#[derive(Debug, Clone, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password_file: Option<PathBuf>,
    pub password_env: Option<String>,
    #[serde(with = "humantime_serde")]
    pub pause_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
}
#[allow(missing_docs)]
impl AdminConfig {
    pub fn validate(&self) -> Result<(), String> {
        Ok(())
    }
    pub fn resolve_paths(&mut self, _base: &Path) {}
}
#[allow(missing_docs)]
#[derive(Debug, thiserror::Error)]
#[error("x")]
pub struct AdminError;
#[allow(missing_docs)]
#[derive(Debug, Clone)]
pub struct Admin(AdminConfig);
#[allow(missing_docs)]
impl Admin {
    pub fn new(c: AdminConfig) -> Admin {
        Admin(c)
    }
    pub fn address(&self) -> String {
        format!("{}:{}", self.0.host, self.0.port)
    }
    pub async fn reload(&self) -> Result<(), AdminError> {
        Ok(())
    }
}
#[allow(missing_docs)]
#[derive(Clone)]
pub struct Pause;
#[allow(missing_docs)]
impl Pause {
    pub fn new(_a: Admin) -> Pause {
        Pause
    }
    pub fn begin(&self, _why: &str) {}
    pub async fn end(&self, _why: &str) -> Result<Option<Duration>, AdminError> {
        Ok(None)
    }
    pub fn is_active(&self) -> bool {
        false
    }
}
