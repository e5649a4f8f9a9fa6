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
