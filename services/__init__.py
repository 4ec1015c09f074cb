"""The four CRM services, their shared runtime, the embedded stack and the `crm` command."""
