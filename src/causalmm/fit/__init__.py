"""Offline fits a method reads at decoding time (``causalmm fit``): VTI's directions (:mod:`.vti`), stored with the
model they belong to (:mod:`.store`)."""
