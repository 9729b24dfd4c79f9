"""Faces in ordinary photos: detection and landmarks (`detection`, dlib-bin) and alignment to the
generator's frame with the component and whole-face masks (`align`)."""
