"""structmat_attention: attention whose scores are bilinear forms through structmat operators (coming next)."""

__all__: list[str] = []
