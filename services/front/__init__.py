"""The OpenAI-compatible HTTP front: `POST /v1/chat/completions` (unary and server-sent events),
`GET /v1/models`, `/health`, over one processor's gRPC API (`triptych serve front`).

schema.py  the request and response shapes (pydantic), as OpenAI's API has them
convert.py OpenAI request <-> processor_pb2 (messages, media parts, sampling) and the replies
errors.py  gRPC statuses and our domain errors -> OpenAI's error shape with the HTTP status
app.py     the FastAPI application: routes, streaming, cancellation on client disconnect
server.py  the process: connect to the processor, serve with uvicorn, stop gracefully on SIGTERM
"""
