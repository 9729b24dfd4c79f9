"""Protection: aligned faces through the jitted generator (`faces`), whole photos (`photos`), and
photo files written back in their own format and metadata (`photo_io`)."""
