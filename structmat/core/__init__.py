"""The core every operator is built on; it imports nothing from the rest of structmat except :mod:`structmat.checks`.

Modules, bottom to top (each imports only the ones above it, at module level):

- ``cost``: the answer types (:class:`Cost`, :class:`Rank`, :class:`Contraction`, :class:`Timing`).
- ``network``: the tensor-network IR (``Factor``, ``Network``), fusion and Kronecker products of networks.
- ``paths``: contraction-path search; ``engine``: compiled programs of ``F.linear``/``mm`` steps.
- ``params``: parameter dtype and the spectral µP default std; ``splits``: factor splits and bond ranks.
- ``freeze``: constant-aware (inference) plans; ``nodes``: the node tree an operator lowers to.
- ``family``: the family registry, ``define_network`` and ``check_heads``; ``base``: :class:`LinearOperator`.

Leaves and families live in :mod:`structmat.operators`; combinators and user tools (``expr``, ``project``,
``init``, ``cli``, ``benchmark``, ``rank``, ``bilinear``) at the top level of the package.
"""
