# One image for the four services; the command picks the service (python -m services.<name>).
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
WORKDIR /app
COPY pyproject.toml constraints.txt README.md ./
COPY contracts ./contracts
COPY services ./services
COPY data ./data
# The loyalty programme's rules (mount another file and set CRM_LOYALTY_RULES_FILE to change them).
COPY deploy/config ./deploy/config
ENV CRM_LOYALTY_RULES_FILE=/app/deploy/config/loyalty.toml
# Production installs no embedded servers: Kafka, MongoDB and Redis are real services.
RUN pip install --no-cache-dir -c constraints.txt . && useradd --system --uid 10001 crm
USER crm
ENV CRM_LOG_JSON=true
