"""Where data enters: image folders and FaceData (`datasets`), CelebAMask-HQ (`celebamask`), the
memory-mapped training cache (`cache`) and the batches the train step takes (`loader`)."""
