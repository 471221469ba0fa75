"""Generation quality: Fréchet distances on named feature extractors, MS-SSIM diversity (groundwork of `medimgen evaluate`)."""
