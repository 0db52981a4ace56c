{{/* Resource-name prefix. */}}
{{- define "meshid.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "meshid.labels" -}}
app.kubernetes.io/name: {{ default .Chart.Name .Values.nameOverride }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: meshid
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* Selector labels of one component: include "meshid.selector" (list . "ca"). */}}
{{- define "meshid.selector" -}}
{{- $root := index . 0 -}}
app.kubernetes.io/name: {{ default $root.Chart.Name $root.Values.nameOverride }}
app.kubernetes.io/instance: {{ $root.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{- define "meshid.caImage" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag -}}
{{- if .Values.image.caDigest -}}
{{ .Values.image.repository }}/ca@{{ .Values.image.caDigest }}
{{- else -}}
{{ .Values.image.repository }}/ca:{{ $tag }}
{{- end -}}
{{- end -}}

{{- define "meshid.injectorImage" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag -}}
{{- if .Values.image.injectorDigest -}}
{{ .Values.image.repository }}/injector@{{ .Values.image.injectorDigest }}
{{- else -}}
{{ .Values.image.repository }}/injector:{{ $tag }}
{{- end -}}
{{- end -}}

{{- define "meshid.sidecarImage" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag -}}
{{- if .Values.image.sidecarDigest -}}
{{ .Values.image.repository }}/sidecar@{{ .Values.image.sidecarDigest }}
{{- else -}}
{{ .Values.image.repository }}/sidecar:{{ $tag }}
{{- end -}}
{{- end -}}

{{- define "meshid.caService" -}}
{{ include "meshid.fullname" . }}-ca
{{- end -}}

{{- define "meshid.injectorService" -}}
{{ include "meshid.fullname" . }}-injector
{{- end -}}

{{/* Restricted pod security, for every container. */}}
{{- define "meshid.containerSecurity" -}}
securityContext:
  runAsNonRoot: true
  runAsUser: 65532
  runAsGroup: 65532
  allowPrivilegeEscalation: false
  privileged: false
  readOnlyRootFilesystem: true
  capabilities:
    drop: [ALL]
  seccompProfile:
    type: RuntimeDefault
{{- end -}}

{{- define "meshid.podSecurity" -}}
securityContext:
  runAsNonRoot: true
  runAsUser: 65532
  runAsGroup: 65532
  fsGroup: 65532
  seccompProfile:
    type: RuntimeDefault
{{- end -}}

{{- define "meshid.pullSecrets" -}}
{{- with .Values.image.pullSecrets }}
imagePullSecrets:
{{- range . }}
  - name: {{ . }}
{{- end }}
{{- end }}
{{- end -}}

{{/* Fails rendering with a clear message when a required value is missing. */}}
{{- define "meshid.required" -}}
{{- if not .Values.ca.existingSecret -}}
{{- fail "ca.existingSecret is required: create it with `meshid-ca secret --dir ./ca | kubectl apply --server-side -f -` (see the chart README)" -}}
{{- end -}}
{{- if not .Values.ca.trustBundle -}}
{{- fail "ca.trustBundle is required: --set-file ca.trustBundle=<ca dir>/bundle.pem (with an imported root, the output of meshid-ca bundle --dir <ca dir>)" -}}
{{- end -}}
{{- if .Values.injector.enabled -}}
{{- $max := include "meshid.durationSeconds" .Values.ca.maxTokenLifetime | int64 -}}
{{- if gt (int64 .Values.sidecar.tokenExpirationSeconds) $max -}}
{{- fail (printf "sidecar.tokenExpirationSeconds (%d) exceeds ca.maxTokenLifetime (%s, %d s): the CA would refuse the service-account token of every injected sidecar; lower sidecar.tokenExpirationSeconds or raise ca.maxTokenLifetime" (int64 .Values.sidecar.tokenExpirationSeconds) .Values.ca.maxTokenLifetime $max) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* A duration in the CA's grammar (the schema's ^[0-9]+(ms|s|m|h|d)$) in whole seconds, rounded down. */}}
{{- define "meshid.durationSeconds" -}}
{{- $unit := regexFind "(ms|s|m|h|d)$" . -}}
{{- $n := trimSuffix $unit . | int64 -}}
{{- if eq $unit "ms" -}}
{{ div $n 1000 }}
{{- else -}}
{{ mul $n (get (dict "s" 1 "m" 60 "h" 3600 "d" 86400) $unit) }}
{{- end -}}
{{- end -}}

{{/* The Secret the injector serves from: cert-manager's (chart-named) or the user's. */}}
{{- define "meshid.injectorTlsSecret" -}}
{{- if eq .Values.injector.tls.source "certManager" -}}
{{ include "meshid.fullname" . }}-injector-tls
{{- else -}}
{{ .Values.injector.tls.existingSecret }}
{{- end -}}
{{- end -}}

{{/* The webhook's caBundle (base64), by injector.tls.source; empty with certManager (cainjector fills it). */}}
{{- define "meshid.webhookCaBundle" -}}
{{- if eq .Values.injector.tls.source "webhookCert" -}}
{{ .Values.ca.trustBundle | b64enc }}
{{- else if eq .Values.injector.tls.source "secret" -}}
{{- if not (contains "-----BEGIN CERTIFICATE-----" .Values.injector.tls.caBundle) -}}
{{- fail "injector.tls.source=secret needs injector.tls.caBundle: the PEM CA certificate(s) that verify the Secret's certificate (--set-file injector.tls.caBundle=ca.crt)" -}}
{{- end -}}
{{ .Values.injector.tls.caBundle | b64enc }}
{{- end -}}
{{- end -}}
