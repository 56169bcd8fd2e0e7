"""Physics simulators: pure batched PyTorch, one module per family.

``BUILTIN`` maps each short name to the import path of its class; the registry in
:mod:`sbipipe.registry` reads it lazily so that importing one family never imports another.
"""

BUILTIN: dict[str, str] = {
    "two_moons": "simulators.benchmarks:TwoMoons",
    "gaussian_linear": "simulators.benchmarks:GaussianLinear",
    "slcp": "simulators.benchmarks:SLCP",
    "cosmo_gaussian": "simulators.cosmology:CosmoGaussian",
    "cosmo_lognormal": "simulators.cosmology:CosmoLognormal",
    "lens_sie": "simulators.lensing:LensSIE",
    "lens_sie_shear": "simulators.lensing:LensSIEShear",
    "dwarf": "simulators.dwarfs:Dwarf",
    "dwarf_cored": "simulators.dwarfs:DwarfCored",
    "dwarf_cusp": "simulators.dwarfs:DwarfCusp",
}

__all__ = ["BUILTIN"]
