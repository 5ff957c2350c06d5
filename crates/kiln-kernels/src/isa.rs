//! Which SIMD instruction set the kernels use, chosen once per process.

use std::sync::OnceLock;

/// An instruction-set level the kernels are compiled for.
///
/// The x86-64 levels and the aarch64 levels are each ordered (`Scalar < Avx2 < Avx512Vnni`,
/// `Scalar < Neon < NeonDotprod`); a CPU that has a level has every lower one of its family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Isa {
    /// Portable code: the scalar references.
    Scalar,
    /// AVX2 with FMA and F16C: `vpmaddubsw` byte products.
    Avx2,
    /// AVX-512 F/BW/VL with VNNI (`vpdpbusd`, `vpdpwssd`), plus FMA and F16C.
    Avx512Vnni,
    /// aarch64 Advanced SIMD without the dot-product extension (`smull` + `sadalp`).
    Neon,
    /// aarch64 Advanced SIMD with the dot-product extension (`sdot`).
    NeonDotprod,
}

impl Isa {
    /// Every level, lowest first within each family.
    pub const ALL: [Isa; 5] = [
        Isa::Scalar,
        Isa::Avx2,
        Isa::Avx512Vnni,
        Isa::Neon,
        Isa::NeonDotprod,
    ];

    /// The name `KILN_ISA` accepts for this level.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512Vnni => "avx512",
            Isa::Neon => "neon",
            Isa::NeonDotprod => "dotprod",
        }
    }

    /// The level named `name` (as [`Isa::name`] spells it; `avx512vnni` and `neon-dotprod`
    /// are accepted too), case-insensitive.
    pub fn from_name(name: &str) -> Option<Isa> {
        let name = name.trim().to_ascii_lowercase();
        match name.as_str() {
            "avx512vnni" => Some(Isa::Avx512Vnni),
            "neon-dotprod" | "neondotprod" => Some(Isa::NeonDotprod),
            _ => Isa::ALL.into_iter().find(|i| i.name() == name),
        }
    }

    /// Whether this CPU can run the level's kernels.
    ///
    /// Probed once per process: the f32 vector kernels check it on every call, and attention
    /// calls them for every (query, key) pair.
    #[inline]
    pub fn is_available(self) -> bool {
        static AVAILABLE: OnceLock<[bool; 5]> = OnceLock::new();
        let all = AVAILABLE.get_or_init(|| Isa::ALL.map(Isa::probe));
        all[self as usize]
    }

    /// Asks the CPU whether it has the level.
    fn probe(self) -> bool {
        match self {
            Isa::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => {
                is_x86_feature_detected!("avx2")
                    && is_x86_feature_detected!("fma")
                    && is_x86_feature_detected!("f16c")
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Vnni => {
                Isa::Avx2.probe()
                    && is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vl")
                    && is_x86_feature_detected!("avx512vnni")
            }
            #[cfg(all(target_arch = "aarch64", target_endian = "little"))]
            Isa::Neon => std::arch::is_aarch64_feature_detected!("neon"),
            #[cfg(all(target_arch = "aarch64", target_endian = "little"))]
            Isa::NeonDotprod => {
                std::arch::is_aarch64_feature_detected!("neon")
                    && std::arch::is_aarch64_feature_detected!("dotprod")
            }
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }

    /// Position within its family (0 for scalar).
    fn rank(self) -> u8 {
        match self {
            Isa::Scalar => 0,
            Isa::Avx2 | Isa::Neon => 1,
            Isa::Avx512Vnni | Isa::NeonDotprod => 2,
        }
    }
}

/// Every level this CPU can run, lowest first (always starts with [`Isa::Scalar`]).
pub fn available_isas() -> Vec<Isa> {
    Isa::ALL.into_iter().filter(|i| i.is_available()).collect()
}

/// The level [`crate::dot`] and [`crate::dot_block`] use: the best this CPU has, unless the
/// environment variable `KILN_ISA` (`scalar`, `avx2`, `avx512`, `neon`, `dotprod`) names a
/// lower available one. Unknown names and levels the CPU lacks are ignored. Read once per
/// process.
pub fn detect() -> Isa {
    static CHOSEN: OnceLock<Isa> = OnceLock::new();
    *CHOSEN.get_or_init(|| {
        let best = available_isas().into_iter().last().unwrap_or(Isa::Scalar);
        choose(best, std::env::var("KILN_ISA").ok().as_deref())
    })
}

/// `best`, or the level `request` names if that one is available and not higher.
pub(crate) fn choose(best: Isa, request: Option<&str>) -> Isa {
    match request.and_then(Isa::from_name) {
        Some(want) if want.is_available() && want.rank() <= best.rank() => want,
        _ => best,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_are_listed_in_declaration_order() {
        // `is_available` indexes its table by the discriminant.
        for (i, isa) in Isa::ALL.into_iter().enumerate() {
            assert_eq!(isa as usize, i);
            assert_eq!(isa.is_available(), isa.probe());
        }
    }

    #[test]
    fn names_round_trip() {
        for isa in Isa::ALL {
            assert_eq!(Isa::from_name(isa.name()), Some(isa));
            assert_eq!(Isa::from_name(&isa.name().to_uppercase()), Some(isa));
        }
        assert_eq!(Isa::from_name("avx512vnni"), Some(Isa::Avx512Vnni));
        assert_eq!(Isa::from_name("sse2"), None);
    }

    #[test]
    fn override_only_lowers() {
        let best = available_isas().into_iter().last().unwrap();
        assert_eq!(choose(best, None), best);
        assert_eq!(choose(best, Some("scalar")), Isa::Scalar);
        assert_eq!(choose(best, Some("nonsense")), best);
        assert_eq!(choose(Isa::Scalar, Some(best.name())), Isa::Scalar);
        for isa in available_isas() {
            assert_eq!(choose(best, Some(isa.name())), isa);
        }
        for isa in Isa::ALL.into_iter().filter(|i| !i.is_available()) {
            assert_eq!(choose(best, Some(isa.name())), best);
        }
        assert!(available_isas().contains(&detect()));
    }
}
