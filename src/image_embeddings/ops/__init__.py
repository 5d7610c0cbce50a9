"""The operator's commands: status, maintenance, evaluation, and the deployment files rendered for EMR,
EMR Serverless and Databricks."""
