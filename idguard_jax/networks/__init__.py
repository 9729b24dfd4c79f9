"""The frozen networks the train step and the evaluation run: the target GANs (`targets`, HiSD's
conditions in `hisd`), the identity networks (`identity`; dlib's network and chip cutter in `dlib`,
`dlib_chips`), Grad-CAM++ heatmaps (`gradcam`), random initialisation and parameter counts."""
