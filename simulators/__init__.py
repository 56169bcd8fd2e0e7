"""Physics simulators: pure batched PyTorch, one module per family.

``BUILTIN`` maps each short name to the import path of its class; the registry in
:mod:`sbipipe.registry` reads it lazily so that importing one family never imports another.

Devices. Every simulator's ``simulate``, ``sample_prior`` and ``log_likelihood`` run on the device
of their inputs (CPU, CUDA, ...), with this convention:

* random numbers are drawn on the generator's device (``generator.device`` when a generator is
  given, else ``theta.device``) and then moved to ``theta.device`` if that differs, so a CPU
  generator with CUDA ``theta`` draws exactly the CPU bits (results then match the CPU up to the
  device's floating-point differences) and a CUDA generator draws natively on the GPU;
* ``sample_prior(n, generator)`` returns θ on the generator's device (CPU when None);
* precomputed tensors (k-grids, quadrature rules, projection matrices, PSF kernels, prior bounds,
  ...) are built on the CPU and copied to the input's device on first use, cached per device
  (and dtype); ``theta`` and ``x`` must share a device;
* the ``prior`` distributions themselves stay on the CPU; ``check_theta`` accepts θ on any device.

On CPU the results are bit-identical to the device-unaware implementation for the same seed.
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
