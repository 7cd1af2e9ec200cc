"""The upload API: clients put datasets into the landing zone through presigned URLs, within a
quota, and finalize them in the catalog (the facility's upload client speaks it unchanged).

:mod:`.service` is the logic (no HTTP), :mod:`.routes` the FastAPI routes, :mod:`.quota` the
persisted reservations, :mod:`.models` the bodies, :mod:`.tokens` the token exchange.
"""
