"""Video-LLaVA VTR code lands here with its own issue."""
