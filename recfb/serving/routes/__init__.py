"""The API's routes, one router per concern; each `router(service)` builds its APIRouter
(the bounds of query parameters come from the service's config, known only at start)."""
