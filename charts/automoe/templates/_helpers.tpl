{{/* Chart name, truncated to the 63 characters Kubernetes allows. */}}
{{- define "automoe.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Full name: release-chart unless overridden. */}}
{{- define "automoe.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "automoe.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "automoe.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* Selector labels of one component: mlflow, postgresql, s3 or pipeline-upload. */}}
{{- define "automoe.selector" -}}
app.kubernetes.io/name: {{ include "automoe.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "automoe.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}{{ with .Values.image.digest }}@{{ . }}{{ end }}
{{- end -}}

{{- define "automoe.postgresHost" -}}
{{- if .Values.postgresql.enabled -}}
{{ include "automoe.fullname" . }}-postgresql
{{- else -}}
{{ required "postgresql.external.host is required when postgresql.enabled is false" .Values.postgresql.external.host }}
{{- end -}}
{{- end -}}

{{- define "automoe.postgresPort" -}}
{{- if .Values.postgresql.enabled -}}5432{{- else -}}{{ .Values.postgresql.external.port }}{{- end -}}
{{- end -}}

{{- define "automoe.s3Endpoint" -}}
{{- if .Values.s3.enabled -}}
http://{{ include "automoe.fullname" . }}-s3:9000
{{- else -}}
{{ .Values.s3.external.endpoint }}
{{- end -}}
{{- end -}}

{{/* Non-root, no privilege escalation, no capabilities. */}}
{{- define "automoe.containerSecurity" -}}
allowPrivilegeEscalation: false
runAsNonRoot: true
capabilities:
  drop: [ALL]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* S3 credentials (the Secret named by "secret": one identity per client) and the endpoint
(never from values). Called with (dict "root" . "secret" NAME). */}}
{{- define "automoe.s3Env" -}}
{{- $root := .root -}}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef: {name: {{ .secret }}, key: AWS_ACCESS_KEY_ID}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef: {name: {{ .secret }}, key: AWS_SECRET_ACCESS_KEY}
{{- with (include "automoe.s3Endpoint" $root) }}
- name: MLFLOW_S3_ENDPOINT_URL
  value: {{ . | quote }}
- name: AWS_ENDPOINT_URL
  value: {{ . | quote }}
{{- end }}
- name: AWS_REGION
  value: {{ $root.Values.s3.external.region | quote }}
{{- end -}}

{{/* The S3 actions of an identity limited to some buckets, as SeaweedFS's s3.json spells them. */}}
{{- define "automoe.s3Actions" -}}
{{- $actions := list -}}
{{- range . -}}
{{- $bucket := . -}}
{{- range (list "Read" "Write" "List" "Tagging") -}}
{{- $actions = append $actions (printf "\"%s:%s\"" . $bucket) -}}
{{- end -}}
{{- end -}}
{{- join ", " $actions -}}
{{- end -}}

{{/* Host headers the MLflow server accepts (it refuses others with 403, the probes excepted):
its Service name in every in-cluster form, with and without a port, localhost for
port-forwarding, and mlflow.allowedHosts (an ingress name, say). */}}
{{- define "automoe.mlflowAllowedHosts" -}}
{{- $svc := printf "%s-mlflow" (include "automoe.fullname" .) -}}
{{- $ns := .Release.Namespace -}}
{{- $hosts := list -}}
{{- range (list $svc (printf "%s.%s" $svc $ns) (printf "%s.%s.svc" $svc $ns) (printf "%s.%s.svc.cluster.local" $svc $ns) "localhost" "127.0.0.1") -}}
{{- $hosts = append $hosts . -}}
{{- $hosts = append $hosts (printf "%s:*" .) -}}
{{- end -}}
{{- concat $hosts .Values.mlflow.allowedHosts | join "," -}}
{{- end -}}
