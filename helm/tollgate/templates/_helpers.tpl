{{/* Names and labels. */}}
{{- define "tollgate.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "tollgate.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "tollgate.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tollgate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "tollgate.labels" -}}
{{ include "tollgate.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "tollgate.image" -}}
{{- if .Values.image.digest -}}
{{ .Values.image.repository }}@{{ .Values.image.digest }}
{{- else -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}
{{- end -}}

{{- define "tollgate.configMapName" -}}
{{- .Values.policy.existingConfigMap | default (printf "%s-policy" (include "tollgate.fullname" .)) -}}
{{- end -}}

{{/*
The policy: the operator's gateway.yaml, or a minimal one forwarding everything to the
upstream. The admin listener binds all interfaces because kubelet probes and Prometheus
reach the pod IP, never the container's loopback.
*/}}
{{- define "tollgate.policy" -}}
{{- if .Values.policy.content -}}
{{ .Values.policy.content }}
{{- else -}}
version: 1
server:
  listen: ["0.0.0.0:{{ .Values.ports.http }}"]
  shutdown_grace: {{ .Values.shutdownGraceSeconds }}s
admin:
  listen: "0.0.0.0:{{ .Values.ports.admin }}"
  token_env: TOLLGATE_ADMIN_TOKEN
upstreams:
  app:
    {{- if eq .Values.mode "sidecar" }}
    servers: ["127.0.0.1:{{ .Values.sidecar.appPort }}"]
    {{- else }}
    {{- if not .Values.upstream.servers }}
    {{- fail "set upstream.servers (host:port of the API) or policy.content" }}
    {{- end }}
    servers: {{ toJson .Values.upstream.servers }}
    {{- end }}
routes:
  - name: all
    upstream: app
{{- end -}}
{{- end -}}

{{/* Kubernetes must wait longer than the gateway's own drain. */}}
{{- define "tollgate.checkGrace" -}}
{{- $needed := add .Values.preStopSleepSeconds .Values.shutdownGraceSeconds 5 -}}
{{- if lt (int .Values.terminationGracePeriodSeconds) (int $needed) -}}
{{- fail (printf "terminationGracePeriodSeconds (%d) must be at least preStopSleepSeconds + shutdownGraceSeconds + 5 = %d" (int .Values.terminationGracePeriodSeconds) (int $needed)) -}}
{{- end -}}
{{- end -}}

{{/*
The gateway container, for this chart's Deployment and for application charts that
include it as a sidecar:
  {{ include "tollgate.sidecar.container" (dict "Values" .Values.tollgate "Chart" .Subcharts.tollgate.Chart "Release" .Release) }}
*/}}
{{- define "tollgate.container" -}}
- name: tollgate
  image: {{ include "tollgate.image" . | quote }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  args: ["run", "-c", "/etc/tollgate/gateway.yaml"]
  ports:
    - name: gateway-http
      containerPort: {{ .Values.ports.http }}
      protocol: TCP
    - name: gateway-admin
      containerPort: {{ .Values.ports.admin }}
      protocol: TCP
  {{- if or .Values.admin.tokenSecret.name .Values.extraEnv }}
  env:
    {{- if .Values.admin.tokenSecret.name }}
    - name: TOLLGATE_ADMIN_TOKEN
      valueFrom:
        secretKeyRef:
          name: {{ .Values.admin.tokenSecret.name }}
          key: {{ .Values.admin.tokenSecret.key }}
    {{- end }}
    {{- with .Values.extraEnv }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- end }}
  startupProbe:
    httpGet: { path: /healthz, port: gateway-admin }
    periodSeconds: 1
    failureThreshold: 30
  livenessProbe:
    httpGet: { path: /healthz, port: gateway-admin }
    periodSeconds: 10
  readinessProbe:
    httpGet: { path: /readyz, port: gateway-admin }
    periodSeconds: 5
  lifecycle:
    preStop:
      sleep:
        seconds: {{ .Values.preStopSleepSeconds }}
  resources:
    {{- toYaml .Values.resources | nindent 4 }}
  securityContext:
    {{- toYaml .Values.securityContext | nindent 4 }}
  volumeMounts:
    - name: tollgate-policy
      mountPath: /etc/tollgate
      readOnly: true
    - name: tollgate-run
      mountPath: /tmp
    {{- with .Values.extraVolumeMounts }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
{{- end -}}

{{/* The sidecar: the same container, as a native sidecar (restartPolicy: Always) when asked or when the cluster has them. */}}
{{- define "tollgate.sidecar.native" -}}
{{- $native := toString .Values.sidecar.native -}}
{{- if eq $native "auto" -}}
{{- semverCompare ">=1.29.0-0" .Capabilities.KubeVersion.Version | toString -}}
{{- else -}}
{{- $native -}}
{{- end -}}
{{- end -}}

{{- define "tollgate.sidecar.container" -}}
{{- $container := include "tollgate.container" . | fromYamlArray -}}
{{- if eq (include "tollgate.sidecar.native" .) "true" -}}
{{- $_ := set (index $container 0) "restartPolicy" "Always" -}}
{{- end -}}
{{- toYaml $container -}}
{{- end -}}

{{/* Volumes the gateway needs: its policy directory, a writable /tmp, and extraVolumes. */}}
{{- define "tollgate.sidecar.volumes" -}}
- name: tollgate-policy
  configMap:
    name: {{ include "tollgate.configMapName" . }}
- name: tollgate-run
  emptyDir: {}
{{- with .Values.extraVolumes }}
{{ toYaml . }}
{{- end }}
{{- end -}}
