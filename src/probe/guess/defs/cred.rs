//! `struct cred`: real and effective user and group ids, found after a
//! short-lived thread takes random ids.

use crate::probe::guess::search::{find_u32, Intersection};
use crate::probe::guess::session::GuessProbe;
use crate::probe::guess::{Ctx, GuessError, GuessRecord, Known};

/// u32 words of a `cred` dumped.
const CRED_WORDS: u32 = 64;
/// Range of random user/group ids (never 0 nor -1).
const ID_MIN: u32 = 100_000;
/// Upper end of the random id range.
const ID_MAX: u32 = 2_000_000_000;

/// Fields of the `cred` guess, with their sizes in bytes.
pub(super) const CRED_FIELDS: &[(&str, u32)] = &[
    ("cred.uid", 4),
    ("cred.gid", 4),
    ("cred.euid", 4),
    ("cred.egid", 4),
];

/// Probes of the `cred` guess.
pub(super) fn cred_probes(_: &Known) -> Result<Vec<GuessProbe>, GuessError> {
    Ok(vec![GuessProbe {
        name: "g_creds",
        functions: &["commit_creds"],
        fetchargs: format!("c=+0($arg1):u32[{CRED_WORDS}]"),
    }])
}

/// `n` distinct random ids.
fn random_ids<const N: usize>() -> [u32; N] {
    let mut out = [0u32; N];
    let mut i = 0;
    while i < N {
        let v = fastrand::u32(ID_MIN..=ID_MAX);
        if !out[..i].contains(&v) {
            out[i] = v;
            i += 1;
        }
    }
    out
}

/// One repetition of the `cred` guess: trigger, read, add candidates.
pub(super) fn cred_rep(ctx: &mut Ctx<'_, '_>, x: &mut Intersection) -> Result<(), GuessError> {
    let [rg, eg, sg, fsg, ru, eu, su] = random_ids::<7>();
    let ids = crate::sys::trigger::ThreadIds {
        gid: [rg, eg, sg, fsg],
        uid: [ru, eu, su, su],
    };
    // Credentials are per thread in the kernel: a short-lived thread takes
    // the ids and exits; the rest of the process keeps its own.
    let tid = std::thread::spawn(move || {
        let tid = crate::sys::current_tid();
        crate::sys::trigger::set_thread_ids(ids).map(|()| tid)
    })
    .join()
    .map_err(|_| GuessError::NoRecord {
        guess: "cred",
        what: "credential thread (panicked)",
        waited: std::time::Duration::ZERO,
    })??;
    let complete = |ctx: &Ctx<'_, '_>, r: &GuessRecord| {
        let c = ctx.field(r, "c");
        r.pid == tid && [ru, eu, rg, eg].iter().all(|v| !find_u32(c, *v).is_empty())
    };
    for r in ctx.collect("credential change", |r| complete(ctx, r))? {
        let c = ctx.field(&r, "c");
        x.add("cred.uid", find_u32(c, ru));
        x.add("cred.gid", find_u32(c, rg));
        x.add("cred.euid", find_u32(c, eu));
        x.add("cred.egid", find_u32(c, eg));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_ids_are_distinct_and_in_range() {
        for _ in 0..100 {
            let ids = random_ids::<7>();
            for (i, v) in ids.iter().enumerate() {
                assert!((ID_MIN..=ID_MAX).contains(v));
                assert!(!ids[..i].contains(v));
            }
        }
    }
}
