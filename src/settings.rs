//! The one typed settings struct, read once from the environment and validated at start-up.
//! Nothing else in lakeguard reads `std::env`.

use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

use url::Url;

use crate::storage::connection::{Connection, ConnectionError};

pub const SOURCE: &str = "SourceStorage";
pub const BACKUP: &str = "BackupStorage";
pub const JOBS: &str = "AzureWebJobsStorage";

#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error(transparent)]
    Connection(#[from] ConnectionError),
    #[error("setting `{name}`: {problem}")]
    Invalid { name: &'static str, problem: String },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CopyEngineKind {
    /// Server-side copy by the storage service (Copy Blob From URL / Put Block From URL).
    Direct,
    /// A Data Factory pipeline run per request, started through the ARM REST API.
    DataFactory,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Clone, Debug)]
pub struct DataFactorySettings {
    pub arm_endpoint: Url,
    pub subscription_id: String,
    pub resource_group: String,
    pub factory_name: String,
    pub pipeline_name: String,
}

#[derive(Clone)]
pub struct Settings {
    pub source: Connection,
    pub backup: Connection,
    pub jobs: Connection,
    pub backup_queue: String,
    pub copy_engine: CopyEngineKind,
    pub concurrency: usize,
    pub max_retries: u32,
    /// Contents of `LAKEGUARD_CA_CERT`, read at start-up so a bad path fails early.
    pub ca_cert_pem: Option<Vec<u8>>,
    pub pending_ttl: Duration,
    pub use_lease: bool,
    pub containers_include: Vec<String>,
    pub containers_exclude: Vec<String>,
    /// Mirrors host.json `extensions.queues.maxDequeueCount`: on the last attempt the worker
    /// poisons a failing message itself, with the error, instead of letting the host drop the why.
    pub max_dequeue_count: u32,
    /// Work budget of one reconcile invocation before it hands the rest over as a continuation.
    pub reconcile_budget: Duration,
    pub datafactory: Option<DataFactorySettings>,
    pub log_filter: String,
    pub log_format: LogFormat,
    /// `FUNCTIONS_CUSTOMHANDLER_PORT` (or legacy `FUNCTIONS_HTTPWORKER_PORT`), for `serve`.
    pub port: Option<u16>,
}

impl fmt::Debug for Settings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Connections redact their own secrets.
        f.debug_struct("Settings")
            .field("source", &self.source)
            .field("backup", &self.backup)
            .field("jobs", &self.jobs)
            .field("backup_queue", &self.backup_queue)
            .field("copy_engine", &self.copy_engine)
            .field("concurrency", &self.concurrency)
            .field("max_retries", &self.max_retries)
            .field("pending_ttl", &self.pending_ttl)
            .field("use_lease", &self.use_lease)
            .finish_non_exhaustive()
    }
}

impl Settings {
    /// Reads the process environment once.
    pub fn from_env() -> Result<Self, SettingsError> {
        Self::from_map(&std::env::vars().collect())
    }

    pub fn from_map(vars: &HashMap<String, String>) -> Result<Self, SettingsError> {
        let get = |k: &str| vars.get(k).map(|v| v.trim().to_owned()).filter(|v| !v.is_empty());
        let source = Connection::from_settings(SOURCE, vars)?;
        let backup = Connection::from_settings(BACKUP, vars)?;
        let jobs = Connection::from_settings(JOBS, vars)?;
        let backup_queue = get("LAKEGUARD_BACKUP_QUEUE").unwrap_or_else(|| "lakeguard-backup".into());
        validate_queue_name(&backup_queue)
            .map_err(|problem| SettingsError::Invalid { name: "LAKEGUARD_BACKUP_QUEUE", problem })?;
        let copy_engine = match get("LAKEGUARD_COPY_ENGINE").as_deref().map(str::to_ascii_lowercase).as_deref() {
            None | Some("direct") => CopyEngineKind::Direct,
            Some("datafactory") => CopyEngineKind::DataFactory,
            Some(other) => {
                return Err(SettingsError::Invalid {
                    name: "LAKEGUARD_COPY_ENGINE",
                    problem: format!("`{other}` is neither `direct` nor `datafactory`"),
                })
            }
        };
        let concurrency = number(vars, "LAKEGUARD_CONCURRENCY", 16, 1, 256)? as usize;
        let max_retries = number(vars, "LAKEGUARD_MAX_RETRIES", 4, 0, 20)? as u32;
        let ca_cert_pem = match get("LAKEGUARD_CA_CERT") {
            None => None,
            Some(path) => Some(std::fs::read(&path).map_err(|e| SettingsError::Invalid {
                name: "LAKEGUARD_CA_CERT",
                problem: format!("cannot read `{path}`: {e}"),
            })?),
        };
        let pending_ttl = Duration::from_secs(number(vars, "LAKEGUARD_PENDING_TTL_SECS", 6 * 3600, 60, 30 * 86400)?);
        let use_lease = boolean(vars, "LAKEGUARD_USE_LEASE")?;
        let list = |k: &str| -> Vec<String> {
            get(k).map(|v| v.split(',').map(|s| s.trim().to_owned()).filter(|s| !s.is_empty()).collect()).unwrap_or_default()
        };
        let max_dequeue_count = number(vars, "LAKEGUARD_MAX_DEQUEUE_COUNT", 5, 1, 100)? as u32;
        let reconcile_budget = Duration::from_secs(number(vars, "LAKEGUARD_RECONCILE_BUDGET_SECS", 420, 5, 3600)?);
        let arm_endpoint = get("LAKEGUARD_ARM_ENDPOINT").unwrap_or_else(|| "https://management.azure.com".into());
        let arm_endpoint = Url::parse(&arm_endpoint)
            .map_err(|e| SettingsError::Invalid { name: "LAKEGUARD_ARM_ENDPOINT", problem: e.to_string() })?;
        let df_sub = get("LAKEGUARD_DATAFACTORY_SUBSCRIPTION_ID");
        let df_rg = get("LAKEGUARD_DATAFACTORY_RESOURCE_GROUP");
        let df_name = get("LAKEGUARD_DATAFACTORY_NAME");
        let datafactory = match (df_sub, df_rg, df_name) {
            (Some(subscription_id), Some(resource_group), Some(factory_name)) => Some(DataFactorySettings {
                arm_endpoint,
                subscription_id,
                resource_group,
                factory_name,
                pipeline_name: get("LAKEGUARD_DATAFACTORY_PIPELINE").unwrap_or_else(|| "lakeguard-backup-copy".into()),
            }),
            (None, None, None) => None,
            _ => {
                return Err(SettingsError::Invalid {
                    name: "LAKEGUARD_DATAFACTORY_*",
                    problem: "set SUBSCRIPTION_ID, RESOURCE_GROUP and NAME together".into(),
                })
            }
        };
        if copy_engine == CopyEngineKind::DataFactory && datafactory.is_none() {
            return Err(SettingsError::Invalid {
                name: "LAKEGUARD_COPY_ENGINE",
                problem: "`datafactory` needs LAKEGUARD_DATAFACTORY_SUBSCRIPTION_ID, _RESOURCE_GROUP and _NAME".into(),
            });
        }
        let log_format = match get("LAKEGUARD_LOG_FORMAT").as_deref() {
            None | Some("text") => LogFormat::Text,
            Some("json") => LogFormat::Json,
            Some(other) => {
                return Err(SettingsError::Invalid { name: "LAKEGUARD_LOG_FORMAT", problem: format!("`{other}`: use text or json") })
            }
        };
        let port = match get("FUNCTIONS_CUSTOMHANDLER_PORT").or_else(|| get("FUNCTIONS_HTTPWORKER_PORT")) {
            None => None,
            Some(p) => Some(p.parse::<u16>().map_err(|_| SettingsError::Invalid {
                name: "FUNCTIONS_CUSTOMHANDLER_PORT",
                problem: format!("`{p}` is not a port"),
            })?),
        };
        Ok(Settings {
            source,
            backup,
            jobs,
            backup_queue,
            copy_engine,
            concurrency,
            max_retries,
            ca_cert_pem,
            pending_ttl,
            use_lease,
            containers_include: list("LAKEGUARD_CONTAINERS_INCLUDE"),
            containers_exclude: list("LAKEGUARD_CONTAINERS_EXCLUDE"),
            max_dequeue_count,
            reconcile_budget,
            datafactory,
            log_filter: get("LAKEGUARD_LOG").unwrap_or_else(|| "info".into()),
            log_format,
            port,
        })
    }

    /// Whether reconcile covers `container` (include list, when set, then exclude list).
    pub fn covers_container(&self, container: &str) -> bool {
        (self.containers_include.is_empty() || self.containers_include.iter().any(|c| c == container))
            && !self.containers_exclude.iter().any(|c| c == container)
    }
}

fn number(vars: &HashMap<String, String>, name: &'static str, default: u64, min: u64, max: u64) -> Result<u64, SettingsError> {
    match vars.get(name).map(|v| v.trim()).filter(|v| !v.is_empty()) {
        None => Ok(default),
        Some(v) => match v.parse::<u64>() {
            Ok(n) if (min..=max).contains(&n) => Ok(n),
            _ => Err(SettingsError::Invalid { name, problem: format!("`{v}` is not a number in {min}..={max}") }),
        },
    }
}

fn boolean(vars: &HashMap<String, String>, name: &'static str) -> Result<bool, SettingsError> {
    match vars.get(name).map(|v| v.trim().to_ascii_lowercase()).as_deref() {
        None | Some("") | Some("false") | Some("0") | Some("no") => Ok(false),
        Some("true") | Some("1") | Some("yes") => Ok(true),
        Some(other) => Err(SettingsError::Invalid { name, problem: format!("`{other}` is not true/false") }),
    }
}

/// Queue names: 3-63 characters, lower-case letters, digits and single hyphens, not at the ends.
/// Our poison queue adds `-poison`, so the base name may have at most 56 characters.
pub fn validate_queue_name(name: &str) -> Result<(), String> {
    let ok_chars = name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if !(3..=56).contains(&name.len()) || !ok_chars || name.starts_with('-') || name.ends_with('-') || name.contains("--") {
        return Err(format!(
            "`{name}` is not a valid queue name (3-56 characters: lower-case letters, digits, single hyphens; `-poison` is appended for the poison queue)"
        ));
    }
    Ok(())
}

/// Container names: 3-63 characters, lower-case letters, digits and single hyphens; `$root`,
/// `$logs` and `$web` are the service's own.
pub fn validate_container_name(name: &str) -> Result<(), String> {
    if matches!(name, "$root" | "$logs" | "$web") {
        return Ok(());
    }
    let ok_chars = name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    let ok_ends = name.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && name.chars().last().is_some_and(|c| c.is_ascii_alphanumeric());
    if !(3..=63).contains(&name.len()) || !ok_chars || !ok_ends || name.contains("--") {
        return Err(format!(
            "`{}` is not a valid container name (3-63 characters: lower-case letters, digits and single hyphens, starting and ending with a letter or digit)",
            name.chars().take(80).collect::<String>()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> HashMap<String, String> {
        [
            (SOURCE, "UseDevelopmentStorage=true"),
            (BACKUP, "AccountName=backupacct;AccountKey=YWJjZA==;BlobEndpoint=http://127.0.0.1:10000/backupacct"),
            (JOBS, "UseDevelopmentStorage=true"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
    }

    #[test]
    fn defaults() {
        let s = Settings::from_map(&base()).unwrap();
        assert_eq!(s.backup_queue, "lakeguard-backup");
        assert_eq!(s.copy_engine, CopyEngineKind::Direct);
        assert_eq!(s.concurrency, 16);
        assert!(s.datafactory.is_none());
        assert!(s.covers_container("raw"));
    }

    #[test]
    fn rejects_invalid_values_with_the_setting_name() {
        for (k, v) in [
            ("LAKEGUARD_COPY_ENGINE", "azcopy"),
            ("LAKEGUARD_CONCURRENCY", "0"),
            ("LAKEGUARD_BACKUP_QUEUE", "Bad_Queue"),
            ("LAKEGUARD_USE_LEASE", "maybe"),
            ("LAKEGUARD_CA_CERT", "/nonexistent/ca.pem"),
        ] {
            let mut m = base();
            m.insert(k.into(), v.into());
            let err = Settings::from_map(&m).unwrap_err().to_string();
            assert!(err.contains(k) || err.contains("LAKEGUARD_"), "{k}: {err}");
        }
        let mut m = base();
        m.insert("LAKEGUARD_COPY_ENGINE".into(), "datafactory".into());
        assert!(Settings::from_map(&m).unwrap_err().to_string().contains("SUBSCRIPTION_ID"));
        let mut m = base();
        m.remove(BACKUP);
        assert!(Settings::from_map(&m).unwrap_err().to_string().contains("BackupStorage"));
    }

    #[test]
    fn container_names() {
        assert!(validate_container_name("raw-data-2026").is_ok());
        for bad in ["", "ab", "Raw", "a--b", "-ab", "ab-", "a_b", &"a".repeat(64), "../x"] {
            assert!(validate_container_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn include_exclude() {
        let mut m = base();
        m.insert("LAKEGUARD_CONTAINERS_INCLUDE".into(), "a1,b2".into());
        m.insert("LAKEGUARD_CONTAINERS_EXCLUDE".into(), "b2".into());
        let s = Settings::from_map(&m).unwrap();
        assert!(s.covers_container("a1"));
        assert!(!s.covers_container("b2"));
        assert!(!s.covers_container("c3"));
    }
}
