//! `pow`, defined here, so that meshid's binaries need no libm.
//!
//! The one libm function they call is `pow` (tokio's multi-thread scheduler averages its task poll
//! times with `f64::powf`), and for that one function the loader mapped all of glibc's libm and ran
//! its start-up: 0.3 MiB of an idle sidecar's RSS (libm's code pages that its IFUNC resolvers and
//! relocations touch, 64 KiB at a time). With `pow` defined in the binary the linker resolves it
//! there, and drops libm from the binary's needed libraries (`--as-needed`, rustc's default):
//! `readelf -d target/dist/meshid-sidecar | grep NEEDED` lists no `libm.so.6`.
//!
//! The definition is the `libm` crate's (a port of musl's, within 1 ulp), so the result may differ
//! from glibc's in the last bit; what calls it is a statistic, not a decision.

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
mod glibc {
    /// C's `double pow(double, double)`.
    // SAFETY: `no_mangle` puts this under the name of libm's `pow`; it has that function's
    // signature and meaning (a pure function of two doubles, no errno set, as LLVM assumes when
    // it lowers `powf`), so every caller of `pow` in the binary gets what it expects.
    #[unsafe(no_mangle)]
    pub(super) extern "C" fn pow(x: f64, y: f64) -> f64 {
        libm::pow(x, y)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn pow_is_the_power_function() {
        let powf = std::hint::black_box(f64::powf);
        for (x, y, want) in [
            (2.0, 10.0, 1024.0),
            (0.9, 0.0, 1.0),
            (0.5, -1.0, 2.0),
            (9.0, 0.5, 3.0),
            (0.0, 0.0, 1.0),
        ] {
            assert_eq!(powf(x, y), want, "{x}^{y}");
        }
        assert!(powf(-1.0, 0.5).is_nan());
        assert_eq!(powf(0.99, 1e6), 0.0);
        let third = powf(0.9, 3.0);
        assert!((third - 0.729).abs() < 1e-15, "{third}");
    }
}
