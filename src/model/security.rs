//! ADLS Gen2 (hierarchical namespace) security state of one path: owner, owning group, POSIX
//! permissions and the access control list (access entries and, on directories, `default:`
//! entries), as List Blobs `include=permissions` and Path Get Access Control report them.
//!
//! How lakeguard keeps it (README "ADLS Gen2 fidelity"): on every backup blob (base and
//! snapshots, so on every version lakeguard keeps) as metadata
//! `lakeguard_owner`, `lakeguard_group`, `lakeguard_permissions`, `lakeguard_acl` (the whole ACL
//! string, `default:` entries included) and `lakeguard_security_at` (when this state was
//! observed in the source). Metadata, not a sidecar blob: it travels with the version (a backup
//! snapshot keeps the metadata it was taken with), costs no extra request to read (the backup
//! listings already ask for metadata) and fits the 8 KiB limit on all metadata of a blob
//! (names + values): the five names take 93 bytes; owner and group are object ids (36 bytes each)
//! or short names, permissions 10; an ACL has at most 32 access + 32 default entries, and the
//! longest entry (`default:group:<36-byte object id>:rwx`) is 54 bytes plus a comma, so at most
//! 64 × 55 = 3,520 bytes; with the ~250 bytes of lakeguard's other keys that leaves more than
//! 4 KiB for the blob's own user metadata.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use super::metadata;

/// Metadata names of the recorded security state.
pub const OWNER: &str = "lakeguard_owner";
pub const GROUP: &str = "lakeguard_group";
pub const PERMISSIONS: &str = "lakeguard_permissions";
pub const ACL: &str = "lakeguard_acl";
/// When the recorded state was observed in the source (RFC 3339): the time from which restore
/// takes it as the path's state (see `core::history`).
pub const SECURITY_AT: &str = "lakeguard_security_at";
/// On backup blobs that stand for a source *directory* (zero length, `hdi_isfolder=true`).
pub const DIRECTORY: &str = "lakeguard_directory";

/// At most this many entries in each of the access and the default ACL (service limit).
pub const MAX_ENTRIES_PER_SCOPE: usize = 32;

/// Owner, group, permissions and ACL of one path, as the service reports them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Security {
    pub owner: String,
    pub group: String,
    /// Symbolic, e.g. `rwxr-x---`, optionally with `+` (an extended ACL exists) or a sticky bit.
    pub permissions: String,
    /// Comma-separated ACL entries, `default:` entries included.
    pub acl: String,
}

/// One parsed ACL entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AclEntry {
    pub default: bool,
    /// `user`, `group`, `mask` or `other`.
    pub kind: String,
    /// Empty for the owning user / owning group / mask / other.
    pub id: String,
    /// `rwx` with `-` for a missing right.
    pub perms: String,
}

/// Parses and validates an ACL string against the documented grammar
/// `[default:](user|group|mask|other):[id]:[r-][w-][x-]`, comma-separated, at most 32 entries in
/// each scope. An empty string is an empty ACL.
pub fn parse_acl(acl: &str) -> Result<Vec<AclEntry>, String> {
    let mut out = Vec::new();
    if acl.trim().is_empty() {
        return Ok(out);
    }
    for raw in acl.split(',') {
        let entry = raw.trim();
        let (default, rest) = match entry.strip_prefix("default:") {
            Some(r) => (true, r),
            None => (false, entry),
        };
        let parts: Vec<&str> = rest.split(':').collect();
        let [kind, id, perms] = parts[..] else {
            return Err(format!(
                "ACL entry `{entry}`: expected [default:]type:[id]:perms"
            ));
        };
        if !matches!(kind, "user" | "group" | "mask" | "other") {
            return Err(format!(
                "ACL entry `{entry}`: type `{kind}` is not user, group, mask or other"
            ));
        }
        if matches!(kind, "mask" | "other") && !id.is_empty() {
            return Err(format!("ACL entry `{entry}`: {kind} takes no id"));
        }
        let p = perms.as_bytes();
        let ok = p.len() == 3
            && matches!(p[0], b'r' | b'-')
            && matches!(p[1], b'w' | b'-')
            && matches!(p[2], b'x' | b'-');
        if !ok {
            return Err(format!(
                "ACL entry `{entry}`: permissions `{perms}` are not [r-][w-][x-]"
            ));
        }
        out.push(AclEntry {
            default,
            kind: kind.to_owned(),
            id: id.to_owned(),
            perms: perms.to_owned(),
        });
    }
    for default in [false, true] {
        let n = out.iter().filter(|e| e.default == default).count();
        if n > MAX_ENTRIES_PER_SCOPE {
            return Err(format!(
                "{n} {} ACL entries; at most {MAX_ENTRIES_PER_SCOPE} are allowed",
                if default { "default" } else { "access" }
            ));
        }
    }
    Ok(out)
}

impl Security {
    /// Whether the ACL carries `default:` entries (only directories may).
    pub fn has_default_acl(&self) -> bool {
        parse_acl(&self.acl)
            .map(|v| v.iter().any(|e| e.default))
            .unwrap_or(false)
    }

    /// The recorded state in a blob's metadata, when all four keys are there.
    pub fn from_metadata(m: &BTreeMap<String, String>) -> Option<Security> {
        Some(Security {
            owner: m.get(OWNER)?.clone(),
            group: m.get(GROUP)?.clone(),
            permissions: m.get(PERMISSIONS)?.clone(),
            acl: m.get(ACL)?.clone(),
        })
    }

    /// When the state in `m` was observed (`lakeguard_security_at`), if readable.
    pub fn observed_at(m: &BTreeMap<String, String>) -> Option<OffsetDateTime> {
        m.get(SECURITY_AT).and_then(|s| metadata::parse_time(s))
    }

    /// Writes this state (observed at `at`) into `m`, replacing any recorded before.
    pub fn write_metadata(&self, m: &mut BTreeMap<String, String>, at: OffsetDateTime) {
        m.insert(OWNER.into(), self.owner.clone());
        m.insert(GROUP.into(), self.group.clone());
        m.insert(PERMISSIONS.into(), self.permissions.clone());
        m.insert(ACL.into(), self.acl.clone());
        m.insert(SECURITY_AT.into(), metadata::format_time(at));
    }

    /// Copies the recorded security keys (and the observation time) from `from` into `to`.
    pub fn copy_keys(from: &BTreeMap<String, String>, to: &mut BTreeMap<String, String>) {
        for k in [OWNER, GROUP, PERMISSIONS, ACL, SECURITY_AT] {
            if let Some(v) = from.get(k) {
                to.insert(k.into(), v.clone());
            }
        }
    }

    /// The permissions to send with `x-ms-permissions`: without the `+` the service appends when
    /// an extended ACL exists (it is a report, not a settable bit).
    pub fn settable_permissions(&self) -> &str {
        self.permissions.trim_end_matches('+')
    }

    /// Same state for restore and verify: owner, group and ACL compared as given, the ACL entry by
    /// entry in any order (the service may list them in its own order), the permissions without
    /// the `+` report flag.
    pub fn same_as(&self, other: &Security) -> bool {
        let norm = |acl: &str| {
            let mut v: Vec<String> = acl
                .split(',')
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty())
                .collect();
            v.sort();
            v
        };
        self.owner == other.owner
            && self.group == other.group
            && self.settable_permissions() == other.settable_permissions()
            && norm(&self.acl) == norm(&other.acl)
    }

    /// Which of the four parts differ from `other` (for reports).
    pub fn differences(&self, other: &Security) -> Vec<&'static str> {
        let mut out = Vec::new();
        if self.owner != other.owner {
            out.push("owner");
        }
        if self.group != other.group {
            out.push("group");
        }
        if self.settable_permissions() != other.settable_permissions() {
            out.push("permissions");
        }
        let a = Security {
            owner: String::new(),
            group: String::new(),
            permissions: String::new(),
            acl: self.acl.clone(),
        };
        let b = Security {
            acl: other.acl.clone(),
            ..a.clone()
        };
        if !a.same_as(&b) {
            out.push("acl");
        }
        out
    }
}

/// Whether an observed state `new` (at `new_at`) must be recorded over the one a backup version
/// holds (`recorded`, observed at `recorded_at`): when none is recorded, or it differs and is not
/// newer (a late request must not put an older state back on top).
pub fn should_record(
    recorded: Option<&Security>,
    recorded_at: Option<OffsetDateTime>,
    new: &Security,
    new_at: OffsetDateTime,
) -> bool {
    match recorded {
        None => true,
        Some(r) if r.same_as(new) => false,
        Some(_) => recorded_at.is_none_or(|at| new_at > at),
    }
}

/// The security state current at `t` among recorded states `(observed_at, state)` of one
/// content version: the last one observed at or before `t`; before the first observation, the
/// first one (the state the version was first backed up with is the best knowledge of the time
/// between its creation and that backup).
pub fn state_at(
    states: &[(Option<OffsetDateTime>, Security)],
    t: OffsetDateTime,
) -> Option<&Security> {
    let mut sorted: Vec<&(Option<OffsetDateTime>, Security)> = states.iter().collect();
    // Unknown observation times first: they are the oldest records (written before the time was).
    sorted.sort_by_key(|(at, _)| *at);
    let mut best = sorted.first().map(|(_, s)| s)?;
    for (at, s) in &sorted {
        match at {
            Some(at) if *at <= t => best = s,
            None => best = s,
            Some(_) => break,
        }
    }
    Some(best)
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    fn sec(acl: &str) -> Security {
        Security {
            owner: "o".into(),
            group: "g".into(),
            permissions: "rwxr-x---".into(),
            acl: acl.into(),
        }
    }

    #[test]
    fn acl_grammar() {
        let v = parse_acl("user::rwx,user:1234-ab:r-x,group::r--,mask::r-x,other::---,default:user::rwx,default:group:g1:rw-").unwrap();
        assert_eq!(v.len(), 7);
        assert!(v[5].default && v[5].kind == "user" && v[5].id.is_empty());
        assert_eq!(v[1].id, "1234-ab");
        assert!(parse_acl("").unwrap().is_empty());
        for bad in [
            "user::rwxx",
            "user::wrx",
            "bogus::rwx",
            "user:rwx",
            "other:x:rwx",
            "mask:m:r--",
            "default:other::r",
            "user::rwx,,group::r--",
            "scope:user::rwx",
        ] {
            assert!(parse_acl(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn at_most_32_entries_per_scope() {
        let access: Vec<String> = (0..32).map(|i| format!("user:u{i}:r--")).collect();
        let default: Vec<String> = (0..32).map(|i| format!("default:user:u{i}:r--")).collect();
        let both = format!("{},{}", access.join(","), default.join(","));
        assert_eq!(parse_acl(&both).unwrap().len(), 64);
        let too_many = format!("{both},user:extra:r--");
        let e = parse_acl(&too_many).unwrap_err();
        assert!(e.contains("33 access"), "{e}");
        let too_many = format!("{both},default:user:extra:r--");
        assert!(parse_acl(&too_many).unwrap_err().contains("33 default"));
    }

    #[test]
    fn metadata_round_trip_and_size() {
        let s = sec("user::rwx,group::r-x,other::---,default:user::rwx");
        let mut m = BTreeMap::from([("user_key".to_string(), "v".to_string())]);
        let at = datetime!(2026-12-01 10:00:00 UTC);
        s.write_metadata(&mut m, at);
        assert_eq!(Security::from_metadata(&m), Some(s.clone()));
        assert_eq!(Security::observed_at(&m), Some(at));
        assert!(s.has_default_acl());
        let mut copy = BTreeMap::new();
        Security::copy_keys(&m, &mut copy);
        assert_eq!(Security::from_metadata(&copy), Some(s));
        assert!(!copy.contains_key("user_key"));
        m.remove(ACL);
        assert_eq!(Security::from_metadata(&m), None, "all four keys or none");

        // The documented arithmetic: a full ACL of object ids fits the 8 KiB limit with room.
        let id = "0123abcd-0123-4567-89ab-0123456789ab";
        let acl: Vec<String> = (0..32)
            .map(|_| format!("group:{id}:rwx"))
            .chain((0..32).map(|_| format!("default:group:{id}:rwx")))
            .collect();
        let big = Security {
            owner: id.into(),
            group: id.into(),
            permissions: "rwxr-x---+".into(),
            acl: acl.join(","),
        };
        let mut m = BTreeMap::new();
        big.write_metadata(&mut m, at);
        let size: usize = m.iter().map(|(k, v)| k.len() + v.len()).sum();
        assert!(size < 4 * 1024, "{size} bytes");
    }

    #[test]
    fn comparison_ignores_entry_order_and_plus() {
        let a = sec("user::rwx,group::r-x,other::---");
        let mut b = sec("other::---,user::rwx,group::r-x");
        b.permissions = "rwxr-x---+".into();
        assert!(a.same_as(&b));
        assert!(a.differences(&b).is_empty());
        b.acl = "user::rwx,group::r--,other::---".into();
        b.owner = "x".into();
        assert_eq!(a.differences(&b), vec!["owner", "acl"]);
    }

    #[test]
    fn only_a_newer_different_state_is_recorded() {
        let t = datetime!(2026-12-01 10:00:00 UTC);
        let later = t + time::Duration::seconds(1);
        let (a, b) = (sec("user::rwx"), sec("user::r--"));
        assert!(should_record(None, None, &a, t));
        assert!(!should_record(Some(&a), Some(t), &a, later), "same state");
        assert!(should_record(Some(&a), Some(t), &b, later));
        assert!(
            !should_record(Some(&a), Some(later), &b, t),
            "older observation"
        );
        assert!(should_record(Some(&a), None, &b, t));
    }

    #[test]
    fn state_at_picks_the_last_observed_by_t() {
        let t = |h| datetime!(2026-12-01 00:00:00 UTC) + time::Duration::hours(h);
        let states = vec![
            (Some(t(5)), sec("user::rwx")),
            (Some(t(1)), sec("user::r--")),
            (Some(t(9)), sec("user::---")),
        ];
        assert_eq!(
            state_at(&states, t(0)).unwrap().acl,
            "user::r--",
            "before the first: the first"
        );
        assert_eq!(state_at(&states, t(1)).unwrap().acl, "user::r--");
        assert_eq!(state_at(&states, t(6)).unwrap().acl, "user::rwx");
        assert_eq!(state_at(&states, t(9)).unwrap().acl, "user::---");
        assert_eq!(state_at(&[], t(9)), None);
        let with_unknown = vec![(None, sec("user::--x")), (Some(t(5)), sec("user::rwx"))];
        assert_eq!(state_at(&with_unknown, t(1)).unwrap().acl, "user::--x");
        assert_eq!(state_at(&with_unknown, t(5)).unwrap().acl, "user::rwx");
    }
}
