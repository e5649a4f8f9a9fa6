//! lakeguard's own library, configured exactly like the handler of a stack, for tests that drive
//! an operation in-process (e.g. to interleave a write between two of its steps).

use std::collections::HashMap;

use lakeguard::app::App;
use lakeguard::settings::Settings;

/// An `App` from a stack environment (`Stack::env()` / `env_with`).
pub fn app(env: &[(String, String)]) -> App {
    let vars: HashMap<String, String> = env.iter().cloned().collect();
    let settings = Settings::from_map(&vars).expect("stack env is valid settings");
    App::new(settings).expect("clients build")
}

/// Producer then worker drain over `container`, both clean: afterwards the backup holds every
/// current version.
pub async fn cycle(app: &App, container: &str) -> lakeguard::ops::backup::DrainReport {
    use lakeguard::ops::{self, no_progress};
    let r = ops::snapshot::run(app, container, None, no_progress())
        .await
        .expect("producer");
    assert!(r.is_complete(), "{r:?}");
    let d = ops::backup::drain(app, &app.queue, no_progress())
        .await
        .expect("drain");
    assert_eq!(d.poisoned, 0, "{d:?}");
    d
}

/// A restore point strictly after the last write and before the next one (Last-Modified has
/// one-second precision).
pub async fn mark() -> time::OffsetDateTime {
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let t = time::OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    t
}
