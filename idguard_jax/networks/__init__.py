"""The frozen networks the train step and the evaluation run: the target GANs (`targets`, HiSD's
conditions in `hisd`), the identity networks (`identity`; dlib's network and chip cutter in `dlib`,
`dlib_chips`), Grad-CAM++ heatmaps (`gradcam`), random initialisation and parameter counts.

One adapter interface. `targets` and `identity` (and, for its own kind, `idguard_jax.generator`)
split every network into a STATIC part (hashable: a `Target`, an `IdentityNet`, a
`GeneratorConfig`; jit takes it as a constant) and its VARIABLES (a pytree that enters jitted
functions as an argument), and return them in that order, (static, variables):

    build(name, config=None, *, dtype=None, ...)                  -> static
    init_random(name, key, *, config=None, dtype=None, ...)       -> (static, variables)
    abstract_variables(name, *, config=None, ...)                 -> shapes (jax.eval_shape)
    load(name, weights_dir, *, dtype=None, ...)                   -> (static, variables)

`config` holds architecture fields (None: the official network); `dtype` is the compute dtype
(None: float32; parameters stay float32). The options that differ are keyword-only: targets
take `image_size` (init_random, abstract_variables) and HiSD's `references` (load); identity
networks take `normalisation` (build, init_random, load) and no image size (each brings its
input to its own size). `load` refuses a bundle of another network or with other shapes than
its stored config gives (`checkpoint.load_bundle`). The generator: `init_generator(cfg, key)`
-> (cfg, variables), `load_generator(path)` -> (cfg, variables, delta_p).
"""
