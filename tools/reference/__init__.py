"""Plain PyTorch reference of MedCLIPSeg (fixture writer for the Rust engine; never needed by Rust tests)."""
