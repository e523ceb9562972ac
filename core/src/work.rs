//! A count of the entries that joins visit, kept in unit tests only, so a
//! test can show that an operation's cost grows linearly in its size without
//! timing anything. Outside `cfg(test)` the counter compiles to nothing.

#[cfg(test)]
thread_local! {
    static VISITS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// Records that `n` entries (map keys, dots or ranges) were visited.
#[inline]
pub(crate) fn visit(n: usize) {
    #[cfg(test)]
    VISITS.with(|v| v.set(v.get().saturating_add(n as u64)));
    #[cfg(not(test))]
    let _ = n;
}

/// The entries visited by `f` on this thread.
#[cfg(test)]
pub(crate) fn visits_of<T>(f: impl FnOnce() -> T) -> (T, u64) {
    let before = VISITS.with(std::cell::Cell::get);
    let out = f();
    (out, VISITS.with(std::cell::Cell::get) - before)
}
