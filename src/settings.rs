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
    /// Copies above this size use Put Block From URL in parallel blocks (the service's limit for
    /// one Copy Blob From URL is 256 MiB).
    pub copy_block_threshold: u64,
    pub copy_block_size: u64,
    /// Work budget of one reconcile invocation before it hands the rest over as a continuation.
    /// Zero hands over after every page (tests); each invocation still makes progress.
    pub reconcile_budget: Duration,
    /// Work budget of one HTTP producer call (the host answers HTTP within 230 s) before it saves
    /// its place and continues through a continuation message. Zero stops after every page.
    pub producer_budget: Duration,
    /// `LAKEGUARD_DRAIN_IDLE_SECS`: how long `--drain` waits for invisible messages (held by
    /// another consumer, or one that died) to come back before it stops and reports them.
    pub drain_idle: Duration,
    /// `LAKEGUARD_RESTORE_CHUNK_ITEMS`: plan items per chunk (one queue message each) of a
    /// restore started over HTTP.
    pub restore_chunk_items: u32,
    /// `LAKEGUARD_EVENT_QUEUE`: the queue an Event Grid subscription fills (EventBackup).
    pub event_queue: String,
    /// `LAKEGUARD_EVENT_PREFIXES`: comma list of blob-name prefixes events are acted on for
    /// (empty: all); events outside are acknowledged and counted.
    pub event_prefixes: Vec<String>,
    /// Retention (`core::retention`): `LAKEGUARD_RETENTION_BACKUP`,
    /// `LAKEGUARD_RETENTION_SOURCE_SNAPSHOTS`, `LAKEGUARD_TOMBSTONE_RETENTION`.
    pub retention: crate::core::retention::Policy,
    /// Whether any retention setting was given: the `Prune` timer does nothing otherwise.
    pub retention_set: bool,
    /// `LAKEGUARD_UNDO_RETENTION`: how long a restore's undo data and records are kept.
    pub undo_retention: Duration,
    /// `LAKEGUARD_PRUNE_MAX_DELETE_PERCENT`: a prune planning to delete more than this share of
    /// the rows it listed is refused (unless the operator passes `--max-delete`).
    pub prune_max_delete_percent: u32,
    /// `LAKEGUARD_RECONCILE_QUEUE`: reconcile continuations (ReconcileWorker's trigger queue).
    pub reconcile_queue: String,
    /// `LAKEGUARD_PRICE_*`: unit prices of `lakeguard usage`'s cost estimate (USD).
    pub prices: crate::core::usage::Prices,
    /// `LAKEGUARD_USAGE_CHANGED_PERCENT`: share of the live blobs an incremental run copies, in
    /// `lakeguard usage`'s forecast.
    pub usage_changed_percent: f64,
    /// `LAKEGUARD_LIST_PAGE_SIZE`: `maxresults` of reconcile's flat listings (`None` = the
    /// service's maximum, 5000). Snapshot listings always use the service default.
    pub list_page_size: Option<u32>,
    /// `LAKEGUARD_PRODUCER_PAGE_SIZE`: `maxresults` of the producer's listing (`None` = the
    /// service's 5000). Azurite loses snapshot rows at page boundaries, so tests set it only
    /// where a container has no snapshots yet or the listing is of base blobs.
    pub producer_page_size: Option<u32>,
    /// `LAKEGUARD_NAME_ORDER`: the order both accounts list names in (see `core::join::NameOrder`).
    pub name_order: crate::core::NameOrder,
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

/// Container of the backup account reserved for restore bookkeeping (status documents and undo
/// copies of blobs a restore deleted).
pub const RESTORES_CONTAINER: &str = "lakeguard-restores";
/// Container of the backup account holding the producer's watermarks (`ops::watermark`).
pub const STATE_CONTAINER: &str = "lakeguard-state";
/// Name prefix of the backup account's scratch containers of restore drills.
pub const DRILL_CONTAINER_PREFIX: &str = "lakeguard-drill-";

/// Containers lakeguard itself keeps in the backup account: never backed up, reconciled,
/// verified or used as a restore target.
pub fn is_reserved_container(name: &str) -> bool {
    name == RESTORES_CONTAINER
        || name == STATE_CONTAINER
        || name.starts_with(DRILL_CONTAINER_PREFIX)
}

/// A connection given on the command line or in a request: a connection string (it contains
/// `=`), or the name of a connection configured in the environment with the Functions
/// convention (e.g. `BackupStorage`, or `DrStorage` with `DrStorage__blobServiceUri`).
pub fn named_connection(value: &str) -> Result<Connection, SettingsError> {
    let value = value.trim();
    if value.contains('=') {
        return Ok(Connection::parse_connection_string("--to-account", value)?);
    }
    Ok(Connection::from_settings(
        value,
        &std::env::vars().collect(),
    )?)
}

impl Settings {
    /// Reads the process environment once.
    pub fn from_env() -> Result<Self, SettingsError> {
        Self::from_map(&std::env::vars().collect())
    }

    pub fn from_map(vars: &HashMap<String, String>) -> Result<Self, SettingsError> {
        let get = |k: &str| {
            vars.get(k)
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty())
        };
        let mut source = Connection::from_settings(SOURCE, vars)?;
        // ADLS Gen2 source: listings ask `include=permissions`, directories and ACLs are kept.
        if boolean(vars, "LAKEGUARD_SOURCE_HNS")? {
            source.enable_hns()?;
        }
        let backup = Connection::from_settings(BACKUP, vars)?;
        let jobs = Connection::from_settings(JOBS, vars)?;
        let backup_queue =
            get("LAKEGUARD_BACKUP_QUEUE").unwrap_or_else(|| "lakeguard-backup".into());
        validate_queue_name(&backup_queue).map_err(|problem| SettingsError::Invalid {
            name: "LAKEGUARD_BACKUP_QUEUE",
            problem,
        })?;
        let copy_engine = match get("LAKEGUARD_COPY_ENGINE")
            .as_deref()
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
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
        let pending_ttl = Duration::from_secs(number(
            vars,
            "LAKEGUARD_PENDING_TTL_SECS",
            6 * 3600,
            1,
            30 * 86400,
        )?);
        let use_lease = boolean(vars, "LAKEGUARD_USE_LEASE")?;
        let list = |k: &str| -> Vec<String> {
            get(k)
                .map(|v| {
                    v.split(',')
                        .map(|s| s.trim().to_owned())
                        .filter(|s| !s.is_empty())
                        .collect()
                })
                .unwrap_or_default()
        };
        let max_dequeue_count = number(vars, "LAKEGUARD_MAX_DEQUEUE_COUNT", 5, 1, 100)? as u32;
        let copy_block_threshold = number(
            vars,
            "LAKEGUARD_COPY_BLOCK_THRESHOLD_BYTES",
            256 << 20,
            1 << 20,
            256 << 20,
        )?;
        let copy_block_size = number(
            vars,
            "LAKEGUARD_COPY_BLOCK_SIZE_BYTES",
            100 << 20,
            1 << 20,
            4000 << 20,
        )?;
        let reconcile_budget = Duration::from_secs(number(
            vars,
            "LAKEGUARD_RECONCILE_BUDGET_SECS",
            420,
            0,
            3600,
        )?);
        let producer_budget =
            Duration::from_secs(number(vars, "LAKEGUARD_PRODUCER_BUDGET_SECS", 180, 0, 200)?);
        let reconcile_queue =
            get("LAKEGUARD_RECONCILE_QUEUE").unwrap_or_else(|| format!("{backup_queue}-reconcile"));
        validate_queue_name(&reconcile_queue).map_err(|problem| SettingsError::Invalid {
            name: "LAKEGUARD_RECONCILE_QUEUE",
            problem,
        })?;
        if reconcile_queue == backup_queue {
            return Err(SettingsError::Invalid {
                name: "LAKEGUARD_RECONCILE_QUEUE",
                problem: "must differ from LAKEGUARD_BACKUP_QUEUE".into(),
            });
        }
        let list_page_size = match get("LAKEGUARD_LIST_PAGE_SIZE") {
            None => None,
            Some(_) => Some(number(vars, "LAKEGUARD_LIST_PAGE_SIZE", 5000, 1, 5000)? as u32),
        };
        let keep = |name: &'static str, default: &str| {
            crate::core::retention::Keep::parse(get(name).as_deref().unwrap_or(default))
                .map_err(|problem| SettingsError::Invalid { name, problem })
        };
        let retention_set = [
            "LAKEGUARD_RETENTION_BACKUP",
            "LAKEGUARD_RETENTION_SOURCE_SNAPSHOTS",
            "LAKEGUARD_TOMBSTONE_RETENTION",
        ]
        .iter()
        .any(|k| get(k).is_some());
        let duration = |name: &'static str, default: &str| {
            let v = get(name).unwrap_or_else(|| default.to_owned());
            if v.trim().eq_ignore_ascii_case("none") {
                return Ok(None);
            }
            crate::core::retention::parse_duration(&v)
                .map(Some)
                .map_err(|problem| SettingsError::Invalid { name, problem })
        };
        let retention = crate::core::retention::Policy {
            backup: keep("LAKEGUARD_RETENTION_BACKUP", "within=30d,monthly=12")?,
            source_snapshots: keep("LAKEGUARD_RETENTION_SOURCE_SNAPSHOTS", "within=7d")?,
            tombstone_retention: duration("LAKEGUARD_TOMBSTONE_RETENTION", "400d")?,
        };
        let undo_retention = duration("LAKEGUARD_UNDO_RETENTION", "30d")?
            .unwrap_or(Duration::from_secs(100 * 365 * 86_400));
        let prune_max_delete_percent =
            number(vars, "LAKEGUARD_PRUNE_MAX_DELETE_PERCENT", 20, 0, 100)? as u32;
        let event_queue =
            get("LAKEGUARD_EVENT_QUEUE").unwrap_or_else(|| format!("{backup_queue}-events"));
        validate_queue_name(&event_queue).map_err(|problem| SettingsError::Invalid {
            name: "LAKEGUARD_EVENT_QUEUE",
            problem,
        })?;
        if event_queue == backup_queue || event_queue == reconcile_queue {
            return Err(SettingsError::Invalid {
                name: "LAKEGUARD_EVENT_QUEUE",
                problem: "must differ from the backup and reconcile queues".into(),
            });
        }
        let event_prefixes: Vec<String> = get("LAKEGUARD_EVENT_PREFIXES")
            .map(|v| {
                v.split(',')
                    .map(str::trim)
                    .filter(|p| !p.is_empty())
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default();
        let restore_chunk_items =
            number(vars, "LAKEGUARD_RESTORE_CHUNK_ITEMS", 256, 1, 5000)? as u32;
        let defaults = crate::core::usage::Prices::default();
        let prices = crate::core::usage::Prices {
            gb_month: decimal(vars, "LAKEGUARD_PRICE_GB_MONTH", defaults.gb_month, 1e6)?,
            write_10k: decimal(vars, "LAKEGUARD_PRICE_WRITE_10K", defaults.write_10k, 1e6)?,
            read_10k: decimal(vars, "LAKEGUARD_PRICE_READ_10K", defaults.read_10k, 1e6)?,
            list_10k: decimal(vars, "LAKEGUARD_PRICE_LIST_10K", defaults.list_10k, 1e6)?,
            other_10k: decimal(vars, "LAKEGUARD_PRICE_OTHER_10K", defaults.other_10k, 1e6)?,
            queue_10k: decimal(vars, "LAKEGUARD_PRICE_QUEUE_10K", defaults.queue_10k, 1e6)?,
        };
        let usage_changed_percent = decimal(vars, "LAKEGUARD_USAGE_CHANGED_PERCENT", 1.0, 100.0)?;
        let drain_idle =
            Duration::from_secs(number(vars, "LAKEGUARD_DRAIN_IDLE_SECS", 120, 1, 3600)?);
        let producer_page_size = match get("LAKEGUARD_PRODUCER_PAGE_SIZE") {
            None => None,
            Some(_) => Some(number(vars, "LAKEGUARD_PRODUCER_PAGE_SIZE", 5000, 1, 5000)? as u32),
        };
        let name_order = match get("LAKEGUARD_NAME_ORDER")
            .map(|v| v.to_ascii_lowercase())
            .as_deref()
        {
            None | Some("utf16") => crate::core::NameOrder::Utf16Units,
            Some("utf8") => crate::core::NameOrder::Utf8Bytes,
            Some("hierarchical") => crate::core::NameOrder::Hierarchical,
            Some(other) => {
                return Err(SettingsError::Invalid {
                    name: "LAKEGUARD_NAME_ORDER",
                    problem: format!("`{other}`: use utf16 (flat accounts, Azurite), hierarchical (ADLS Gen2) or utf8"),
                })
            }
        };
        if source.hns && name_order != crate::core::NameOrder::Hierarchical {
            return Err(SettingsError::Invalid {
                name: "LAKEGUARD_SOURCE_HNS",
                problem: "a hierarchical-namespace source lists in hierarchical order: set LAKEGUARD_NAME_ORDER=hierarchical (the backup account must list the same way; a flat backup account is not supported yet)".into(),
            });
        }
        let arm_endpoint =
            get("LAKEGUARD_ARM_ENDPOINT").unwrap_or_else(|| "https://management.azure.com".into());
        let arm_endpoint = Url::parse(&arm_endpoint)
            .map_err(|e| e.to_string())
            .and_then(|u| {
                if u.cannot_be_a_base() || !matches!(u.scheme(), "http" | "https") {
                    Err(format!("`{u}` is not an http(s) endpoint"))
                } else if u.scheme() != "https" {
                    // The datafactory engine sends the identity's bearer tokens (and a storage
                    // token as a pipeline parameter) to it.
                    Err(format!(
                        "`{u}` must be https: bearer tokens are never sent over http"
                    ))
                } else {
                    Ok(u)
                }
            })
            .map_err(|problem| SettingsError::Invalid {
                name: "LAKEGUARD_ARM_ENDPOINT",
                problem,
            })?;
        let df_sub = get("LAKEGUARD_DATAFACTORY_SUBSCRIPTION_ID");
        let df_rg = get("LAKEGUARD_DATAFACTORY_RESOURCE_GROUP");
        let df_name = get("LAKEGUARD_DATAFACTORY_NAME");
        let datafactory = match (df_sub, df_rg, df_name) {
            (Some(subscription_id), Some(resource_group), Some(factory_name)) => {
                Some(DataFactorySettings {
                    arm_endpoint,
                    subscription_id,
                    resource_group,
                    factory_name,
                    pipeline_name: get("LAKEGUARD_DATAFACTORY_PIPELINE")
                        .unwrap_or_else(|| "lakeguard-backup-copy".into()),
                })
            }
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
                return Err(SettingsError::Invalid {
                    name: "LAKEGUARD_LOG_FORMAT",
                    problem: format!("`{other}`: use text or json"),
                })
            }
        };
        let port = match get("FUNCTIONS_CUSTOMHANDLER_PORT")
            .or_else(|| get("FUNCTIONS_HTTPWORKER_PORT"))
        {
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
            copy_block_threshold,
            copy_block_size,
            reconcile_budget,
            producer_budget,
            drain_idle,
            restore_chunk_items,
            event_queue,
            event_prefixes,
            retention,
            retention_set,
            undo_retention,
            prune_max_delete_percent,
            reconcile_queue,
            prices,
            usage_changed_percent,
            list_page_size,
            producer_page_size,
            name_order,
            datafactory,
            log_filter: get("LAKEGUARD_LOG").unwrap_or_else(|| "info".into()),
            log_format,
            port,
        })
    }

    /// Whether reconcile covers `container` (include list, when set, then exclude list). The
    /// backup account's own bookkeeping containers ([`is_reserved_container`]) never are: they
    /// have no source container, and must not be taken for deleted ones and tombstoned.
    pub fn covers_container(&self, container: &str) -> bool {
        !is_reserved_container(container)
            && (self.containers_include.is_empty()
                || self.containers_include.iter().any(|c| c == container))
            && !self.containers_exclude.iter().any(|c| c == container)
    }
}

fn number(
    vars: &HashMap<String, String>,
    name: &'static str,
    default: u64,
    min: u64,
    max: u64,
) -> Result<u64, SettingsError> {
    match vars.get(name).map(|v| v.trim()).filter(|v| !v.is_empty()) {
        None => Ok(default),
        Some(v) => match v.parse::<u64>() {
            Ok(n) if (min..=max).contains(&n) => Ok(n),
            _ => Err(SettingsError::Invalid {
                name,
                problem: format!("`{v}` is not a number in {min}..={max}"),
            }),
        },
    }
}

/// A non-negative decimal number up to `max` (prices, percentages).
fn decimal(
    vars: &HashMap<String, String>,
    name: &'static str,
    default: f64,
    max: f64,
) -> Result<f64, SettingsError> {
    match vars.get(name).map(|v| v.trim()).filter(|v| !v.is_empty()) {
        None => Ok(default),
        Some(v) => match v.parse::<f64>() {
            Ok(n) if n.is_finite() && (0.0..=max).contains(&n) => Ok(n),
            _ => Err(SettingsError::Invalid {
                name,
                problem: format!("`{v}` is not a decimal number in 0..={max}"),
            }),
        },
    }
}

fn boolean(vars: &HashMap<String, String>, name: &'static str) -> Result<bool, SettingsError> {
    match vars
        .get(name)
        .map(|v| v.trim().to_ascii_lowercase())
        .as_deref()
    {
        None | Some("") | Some("false") | Some("0") | Some("no") => Ok(false),
        Some("true") | Some("1") | Some("yes") => Ok(true),
        Some(other) => Err(SettingsError::Invalid {
            name,
            problem: format!("`{other}` is not true/false"),
        }),
    }
}

/// Queue names: 3-63 characters, lower-case letters, digits and single hyphens, not at the ends.
/// Our poison queue adds `-poison`, so the base name may have at most 56 characters.
pub fn validate_queue_name(name: &str) -> Result<(), String> {
    let ok_chars = name
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if !(3..=56).contains(&name.len())
        || !ok_chars
        || name.starts_with('-')
        || name.ends_with('-')
        || name.contains("--")
    {
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
    let ok_chars = name
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    let ok_ends = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric())
        && name
            .chars()
            .last()
            .is_some_and(|c| c.is_ascii_alphanumeric());
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

    /// Item 9 of issue 15: the ARM endpoint receives bearer tokens, so it must be https.
    #[test]
    fn the_arm_endpoint_must_be_https() {
        for endpoint in ["http://management.azure.com", "http://127.0.0.1:8080/"] {
            let mut m = base();
            m.insert("LAKEGUARD_ARM_ENDPOINT".into(), endpoint.into());
            let err = Settings::from_map(&m).unwrap_err().to_string();
            assert!(
                err.contains("LAKEGUARD_ARM_ENDPOINT") && err.contains("must be https"),
                "{err}"
            );
        }
        let mut m = base();
        m.insert(
            "LAKEGUARD_ARM_ENDPOINT".into(),
            "https://127.0.0.1:8443".into(),
        );
        assert!(Settings::from_map(&m).is_ok());
    }

    #[test]
    fn rejects_invalid_values_with_the_setting_name() {
        for (k, v) in [
            ("LAKEGUARD_COPY_ENGINE", "azcopy"),
            ("LAKEGUARD_CONCURRENCY", "0"),
            ("LAKEGUARD_BACKUP_QUEUE", "Bad_Queue"),
            ("LAKEGUARD_USE_LEASE", "maybe"),
            ("LAKEGUARD_CA_CERT", "/nonexistent/ca.pem"),
            ("LAKEGUARD_ARM_ENDPOINT", "mailto:ops@example.com"),
        ] {
            let mut m = base();
            m.insert(k.into(), v.into());
            let err = Settings::from_map(&m).unwrap_err().to_string();
            assert!(err.contains(k) || err.contains("LAKEGUARD_"), "{k}: {err}");
        }
        let mut m = base();
        m.insert("LAKEGUARD_COPY_ENGINE".into(), "datafactory".into());
        assert!(Settings::from_map(&m)
            .unwrap_err()
            .to_string()
            .contains("SUBSCRIPTION_ID"));
        let mut m = base();
        m.remove(BACKUP);
        assert!(Settings::from_map(&m)
            .unwrap_err()
            .to_string()
            .contains("BackupStorage"));
    }

    #[test]
    fn source_hns() {
        let s = Settings::from_map(&base()).unwrap();
        assert!(!s.source.hns, "default: flat");
        let mut m = base();
        m.insert("LAKEGUARD_SOURCE_HNS".into(), "true".into());
        m.insert("LAKEGUARD_NAME_ORDER".into(), "hierarchical".into());
        m.insert(
            "SourceStorage__dfsServiceUri".into(),
            "http://127.0.0.1:9999/devstoreaccount1".into(),
        );
        let s = Settings::from_map(&m).unwrap();
        assert!(s.source.hns);
        assert_eq!(
            s.source.dfs_endpoint.as_ref().unwrap().as_str(),
            "http://127.0.0.1:9999/devstoreaccount1"
        );
        let mut flat = m.clone();
        flat.remove("LAKEGUARD_NAME_ORDER");
        let e = Settings::from_map(&flat).unwrap_err().to_string();
        assert!(e.contains("LAKEGUARD_NAME_ORDER"), "{e}");
        let mut bad = m.clone();
        bad.insert("LAKEGUARD_SOURCE_HNS".into(), "perhaps".into());
        assert!(Settings::from_map(&bad)
            .unwrap_err()
            .to_string()
            .contains("LAKEGUARD_SOURCE_HNS"));
    }

    #[test]
    fn container_names() {
        assert!(validate_container_name("raw-data-2026").is_ok());
        for bad in [
            "",
            "ab",
            "Raw",
            "a--b",
            "-ab",
            "ab-",
            "a_b",
            &"a".repeat(64),
            "../x",
        ] {
            assert!(validate_container_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn reconcile_knobs() {
        let s = Settings::from_map(&base()).unwrap();
        assert_eq!(s.reconcile_queue, "lakeguard-backup-reconcile");
        assert_eq!(s.list_page_size, None);
        assert_eq!(s.name_order, crate::core::NameOrder::Utf16Units);
        let mut m = base();
        m.insert("LAKEGUARD_LIST_PAGE_SIZE".into(), "2".into());
        m.insert("LAKEGUARD_NAME_ORDER".into(), "Hierarchical".into());
        m.insert("LAKEGUARD_RECONCILE_BUDGET_SECS".into(), "0".into());
        let s = Settings::from_map(&m).unwrap();
        assert_eq!(s.list_page_size, Some(2));
        assert_eq!(s.name_order, crate::core::NameOrder::Hierarchical);
        assert_eq!(s.reconcile_budget, Duration::ZERO);
        for (k, v) in [
            ("LAKEGUARD_LIST_PAGE_SIZE", "0"),
            ("LAKEGUARD_LIST_PAGE_SIZE", "5001"),
            ("LAKEGUARD_NAME_ORDER", "alphabetical"),
            ("LAKEGUARD_RECONCILE_QUEUE", "Bad_Queue"),
            ("LAKEGUARD_RECONCILE_QUEUE", "lakeguard-backup"),
        ] {
            let mut m = base();
            m.insert(k.into(), v.into());
            let err = Settings::from_map(&m).unwrap_err().to_string();
            assert!(err.contains(k), "{k}={v}: {err}");
        }
        // A long backup queue name needs explicit reconcile and event queues (the defaults derived
        // from it would be too long).
        let mut m = base();
        m.insert("LAKEGUARD_BACKUP_QUEUE".into(), "q".repeat(50));
        assert!(Settings::from_map(&m).is_err());
        m.insert(
            "LAKEGUARD_RECONCILE_QUEUE".into(),
            "lakeguard-reconcile".into(),
        );
        let err = Settings::from_map(&m).unwrap_err().to_string();
        assert!(err.contains("LAKEGUARD_EVENT_QUEUE"), "{err}");
        m.insert("LAKEGUARD_EVENT_QUEUE".into(), "lakeguard-events".into());
        assert!(Settings::from_map(&m).is_ok());
    }

    #[test]
    fn prices_and_the_changed_share() {
        let s = Settings::from_map(&base()).unwrap();
        assert_eq!(s.prices, crate::core::usage::Prices::default());
        assert_eq!(s.usage_changed_percent, 1.0);
        let mut m = base();
        m.insert("LAKEGUARD_PRICE_GB_MONTH".into(), "0.018".into());
        m.insert("LAKEGUARD_USAGE_CHANGED_PERCENT".into(), "12.5".into());
        let s = Settings::from_map(&m).unwrap();
        assert_eq!(s.prices.gb_month, 0.018);
        assert_eq!(s.usage_changed_percent, 12.5);
        for (k, v) in [
            ("LAKEGUARD_PRICE_WRITE_10K", "-1"),
            ("LAKEGUARD_PRICE_READ_10K", "cheap"),
            ("LAKEGUARD_PRICE_LIST_10K", "NaN"),
            ("LAKEGUARD_USAGE_CHANGED_PERCENT", "101"),
        ] {
            let mut m = base();
            m.insert(k.into(), v.into());
            let err = Settings::from_map(&m).unwrap_err().to_string();
            assert!(err.contains(k), "{k}={v}: {err}");
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
