{{/* Names and labels. */}}
{{- define "portcullis.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "portcullis.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "portcullis.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Selector labels; call with (dict "root" $ "component" "server"). */}}
{{- define "portcullis.selectorLabels" -}}
app.kubernetes.io/name: {{ include "portcullis.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "portcullis.labels" -}}
helm.sh/chart: {{ include "portcullis.chart" .root }}
{{ include "portcullis.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
{{- end }}

{{- define "portcullis.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "portcullis.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* repository:tag or repository@digest of an image map; call with (dict "image" . "default" tag). */}}
{{- define "portcullis.imageRef" -}}
{{- if .image.digest }}
{{- printf "%s@%s" .image.repository .image.digest }}
{{- else }}
{{- printf "%s:%s" .image.repository (toString (default .default .image.tag)) }}
{{- end }}
{{- end }}

{{- define "portcullis.image" -}}
{{- include "portcullis.imageRef" (dict "image" .Values.image "default" .Chart.AppVersion) }}
{{- end }}

{{/* Fixed paths inside the pod. */}}
{{- define "portcullis.paths.config" -}}/etc/portcullis/config{{- end }}
{{- define "portcullis.paths.keys" -}}/etc/portcullis/keys{{- end }}
{{- define "portcullis.paths.pepper" -}}/etc/portcullis/pepper{{- end }}
{{- define "portcullis.paths.tls" -}}/etc/portcullis/tls{{- end }}
{{- define "portcullis.paths.clientCA" -}}/etc/portcullis/client-ca{{- end }}
{{- define "portcullis.paths.data" -}}/var/lib/portcullis{{- end }}

{{/*
Chart-created Secrets: <fullname>-database (a pre-install/pre-upgrade hook, for the
migration Job), <fullname>-secrets (Redis, SMTP, pepper) and <fullname>-keys.
*/}}
{{- define "portcullis.secretName.database" -}}{{ include "portcullis.fullname" . }}-database{{- end }}
{{- define "portcullis.secretName.runtime" -}}{{ include "portcullis.fullname" . }}-secrets{{- end }}
{{- define "portcullis.secretName.keys" -}}{{ include "portcullis.fullname" . }}-keys{{- end }}

{{/*
The Secret and key of one of secrets.{databaseUrl,redisUrl,smtpUrl,pepper} as
"name/key", or "" when neither existingSecret nor value is given. Both given: fail.
Call with (dict "root" $ "item" "redisUrl").
*/}}
{{- define "portcullis.secretRef" -}}
{{- $s := index .root.Values.secrets .item }}
{{- if and $s.existingSecret $s.value }}
{{- fail (printf "portcullis: secrets.%s: set existingSecret or value, not both" .item) }}
{{- end }}
{{- if $s.existingSecret }}
{{- printf "%s/%s" $s.existingSecret $s.key }}
{{- else if $s.value }}
{{- $name := ternary (include "portcullis.secretName.database" .root) (include "portcullis.secretName.runtime" .root) (eq .item "databaseUrl") }}
{{- printf "%s/%s" $name $s.key }}
{{- end }}
{{- end }}

{{/* An env entry from a secretRef "name/key"; call with (dict "env" "PORTCULLIS_X" "ref" "name/key"). */}}
{{- define "portcullis.secretEnv" -}}
{{- $parts := splitn "/" 2 .ref -}}
- name: {{ .env }}
  valueFrom:
    secretKeyRef:
      name: {{ $parts._0 }}
      key: {{ $parts._1 | quote }}
{{- end }}

{{/* The keys Secret's name, or "" when no keys are given. */}}
{{- define "portcullis.keysSecret" -}}
{{- $k := .Values.secrets.signingKeys }}
{{- if and $k.existingSecret $k.files }}
{{- fail "portcullis: secrets.signingKeys: set existingSecret or files, not both" }}
{{- end }}
{{- if $k.existingSecret }}{{ $k.existingSecret }}
{{- else if $k.files }}{{ include "portcullis.secretName.keys" . }}
{{- end }}
{{- end }}

{{/*
Checks made at template time in server mode: what production refuses to start without,
and settings the pod layout depends on.
*/}}
{{- define "portcullis.validate" -}}
{{- $missing := list }}
{{- range $item, $what := dict "databaseUrl" "the PostgreSQL URL (database_url)" "redisUrl" "the Redis URL (redis_url)" "pepper" "the password pepper (password.pepper_file)" }}
{{- if not (include "portcullis.secretRef" (dict "root" $ "item" $item)) }}
{{- $s := index $.Values.secrets $item }}
{{- $missing = append $missing (printf "secrets.%s: %s. Set secrets.%s.existingSecret (a Secret with the key %q) or secrets.%s.value (the chart creates the Secret; development only)" $item $what $item $s.key $item) }}
{{- end }}
{{- end }}
{{- if not (include "portcullis.keysSecret" .) }}
{{- $missing = append $missing "secrets.signingKeys: the token signing keys (tokens.keys_dir). Set secrets.signingKeys.existingSecret (a Secret of <name>.pem PKCS#8 keys from `portcullis keys generate`) or secrets.signingKeys.files" }}
{{- end }}
{{- if $missing }}
{{- fail (printf "\n\nportcullis: server mode needs these secrets (production refuses to start without them):\n  - %s\n" (join "\n  - " $missing)) }}
{{- end }}
{{- range $name, $_ := .Values.secrets.signingKeys.files }}
{{- if not (hasSuffix ".pem" $name) }}
{{- fail (printf "portcullis: secrets.signingKeys.files: %q must end in .pem (only *.pem files are loaded)" $name) }}
{{- end }}
{{- end }}
{{- with .Values.secrets.pepper.value }}
{{- if or (not (regexMatch "^[A-Za-z0-9+/]+={0,2}$" (trim .))) (lt (len (trim .)) 44) }}
{{- fail "portcullis: secrets.pepper.value must be base64 of at least 32 random bytes (head -c 32 /dev/urandom | base64)" }}
{{- end }}
{{- end }}
{{- $server := dig "server" dict (.Values.config | default dict) }}
{{- if eq (toString (index $server "ops_enabled")) "false" }}
{{- fail "portcullis: config.server.ops_enabled = false: the chart needs the ops port (liveness /healthz, /readyz with TLS, metrics)" }}
{{- end }}
{{- if .Values.tls.enabled }}
{{- if not .Values.tls.secretName }}
{{- fail "portcullis: tls.enabled needs tls.secretName (a kubernetes.io/tls Secret, e.g. from cert-manager)" }}
{{- end }}
{{- if and .Values.tls.clientCA.enabled .Values.tests.enabled (not .Values.tests.tlsClientSecret) }}
{{- fail "portcullis: with mutual TLS (tls.clientCA.enabled) the helm test pod needs a client certificate: set tests.tlsClientSecret, or tests.enabled=false" }}
{{- end }}
{{- else if .Values.tls.clientCA.enabled }}
{{- fail "portcullis: tls.clientCA.enabled (mutual TLS) needs tls.enabled" }}
{{- end }}
{{- if not (has .Values.probes.liveness.handler (list "http" "grpc")) }}
{{- fail "portcullis: probes.liveness.handler must be http or grpc" }}
{{- end }}
{{- $grace := toString (index $server "shutdown_grace" | default "20s") }}
{{- $seconds := -1 }}
{{- if regexMatch "^[0-9]+s$" $grace }}{{ $seconds = trimSuffix "s" $grace | int }}
{{- else if regexMatch "^[0-9]+m$" $grace }}{{ $seconds = mul (trimSuffix "m" $grace | int) 60 }}
{{- end }}
{{- if ge (int $seconds) 0 }}
{{- $needed := add $seconds (int .Values.lifecycle.preStopSleepSeconds) }}
{{- if le (int .Values.terminationGracePeriodSeconds) (int $needed) }}
{{- fail (printf "portcullis: terminationGracePeriodSeconds (%d) must exceed config.server.shutdown_grace (%s) + lifecycle.preStopSleepSeconds (%d), or the kubelet kills calls still draining" (int .Values.terminationGracePeriodSeconds) $grace (int .Values.lifecycle.preStopSleepSeconds)) }}
{{- end }}
{{- end }}
{{- end }}

{{/*
.Values.config with database.migrate_on_start defaulting to false while the migration Job
runs, and whole numbers as integers: Helm reads every number of values.yaml as a float, and
toToml would write 2 as 2.0, which the server's integer settings refuse.
*/}}
{{- define "portcullis.configToml" -}}
{{- $config := deepCopy (.Values.config | default dict) }}
{{- $database := get $config "database" | default dict }}
{{- if not (hasKey $database "migrate_on_start") }}
{{- $_ := set $database "migrate_on_start" (not .Values.migration.enabled) }}
{{- end }}
{{- $_ := set $config "database" $database }}
{{- include "portcullis.intify" $config }}
{{- toToml $config }}
{{- end }}

{{/* Replaces, in place, whole float64 numbers of a map (and its maps and lists) by int64. */}}
{{- define "portcullis.intify" -}}
{{- $m := . }}
{{- range $k, $v := $m }}
{{- if kindIs "float64" $v }}
{{- if eq (float64 (int64 $v)) $v }}{{ $_ := set $m $k (int64 $v) }}{{ end }}
{{- else if kindIs "map" $v }}
{{- include "portcullis.intify" $v }}
{{- else if kindIs "slice" $v }}
{{- $items := list }}
{{- range $item := $v }}
{{- if and (kindIs "float64" $item) (eq (float64 (int64 $item)) $item) }}
{{- $items = append $items (int64 $item) }}
{{- else }}
{{- if kindIs "map" $item }}{{ include "portcullis.intify" $item }}{{ end }}
{{- $items = append $items $item }}
{{- end }}
{{- end }}
{{- $_ := set $m $k $items }}
{{- end }}
{{- end }}
{{- end }}

{{/* The pod-level hardening, shared by the server, the migration Job and the test pod. */}}
{{- define "portcullis.podSecurityContext" -}}
{{- toYaml .Values.podSecurityContext }}
{{- end }}

{{- define "portcullis.containerSecurityContext" -}}
{{- toYaml .Values.securityContext }}
{{- end }}
