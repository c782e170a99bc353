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
{{- $config := .Values.config | default dict }}
{{- /* Secrets belong in `secrets` (Secret objects), not in the ConfigMap. */}}
{{- $inConfig := list }}
{{- range $path := list "database_url=secrets.databaseUrl" "redis_url=secrets.redisUrl" "password.pepper=secrets.pepper" "mail.smtp_url=secrets.smtpUrl" }}
{{- $parts := splitList "=" $path }}
{{- $keys := splitList "." (first $parts) }}
{{- $table := $config }}
{{- if eq (len $keys) 2 }}{{ $table = get $config (first $keys) }}{{ end }}
{{- if and (kindIs "map" $table) (hasKey $table (last $keys)) }}
{{- $inConfig = append $inConfig (printf "config.%s: use %s (existingSecret, or value in development)" (first $parts) (last $parts)) }}
{{- end }}
{{- end }}
{{- if $inConfig }}
{{- fail (printf "\n\nportcullis: secrets do not belong in `config` (it is rendered into a ConfigMap, readable by whoever can read ConfigMaps; and config.password.pepper would silently win over the pepper Secret's password.pepper_file):\n  - %s\n" (join "\n  - " $inConfig)) }}
{{- end }}
{{- $mail := get $config "mail" | default dict }}
{{- $devMail := eq (toString (dig "allowFileDelivery" false (.Values.mail | default dict))) "true" }}
{{- if not (or (include "portcullis.secretRef" (dict "root" $ "item" "smtpUrl")) $devMail) }}
{{- fail "portcullis: no SMTP: set secrets.smtpUrl (existingSecret, a Secret with the smtps://user:password@host:465 URL). Without it mail (verification, reset and new-device links: live tokens) would be written as .eml files to the pod's emptyDir, where nobody receives it; mail.allowFileDelivery=true allows that, for development only" }}
{{- end }}
{{- $frontend := toString (get $mail "frontend_base_url" | default "") }}
{{- if not $frontend }}
{{- fail "portcullis: config.mail.frontend_base_url is required: the front end serving the pages mail links point to (e.g. https://app.example.com); the server's default, http://localhost:3000, would mail links nobody can open" }}
{{- end }}
{{- if and (regexMatch "^[a-zA-Z]+://(localhost|127\\.[0-9.]+|\\[::1\\])([:/]|$)" $frontend) (not $devMail) }}
{{- fail (printf "portcullis: config.mail.frontend_base_url (%s) is a loopback address: mail links would point to the recipient's own machine. Set your front end's public URL (mail.allowFileDelivery=true accepts it, for development only)" $frontend) }}
{{- end }}
{{- $server := dig "server" dict $config }}
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
{{- $graceSeconds := include "portcullis.durationSeconds" $grace }}
{{- if eq $graceSeconds "invalid" }}
{{- fail (printf "portcullis: config.server.shutdown_grace (%s) is not a duration: a number and a unit, repeated, e.g. 20s, 1m30s, 90000ms (units ns, us, ms, s, m, h, d and humantime's long names)" $grace) }}
{{- end }}
{{- /*
After the drain (shutdown_grace) the server stops its background work, each bounded
(src/startup/mod.rs, Application::run): activity flush 5 s, mail outbox 5 s, ops HTTP
server 5 s, revocation reconciler 1 s, history purge 1 s: 17 s at most.
*/}}
{{- $afterDrain := 17 }}
{{- $needed := add (int .Values.lifecycle.preStopSleepSeconds) (atoi $graceSeconds) $afterDrain }}
{{- if le (int .Values.terminationGracePeriodSeconds) (int $needed) }}
{{- fail (printf "portcullis: terminationGracePeriodSeconds (%d) must exceed lifecycle.preStopSleepSeconds (%d) + config.server.shutdown_grace (%s) + %d s of shutdown after the drain (activity flush, mail outbox, ops server: 5 s each; two tasks 1 s each) = %d, or the kubelet kills the pod while it drains or flushes" (int .Values.terminationGracePeriodSeconds) (int .Values.lifecycle.preStopSleepSeconds) $grace $afterDrain (int $needed)) }}
{{- end }}
{{- end }}

{{/*
A duration as humantime (the server's parser) and Go write it: "20s", "1m30s", "1m 30s",
"90000ms", "2 min", as whole seconds rounded up, or "invalid". Call with the string.
*/}}
{{- define "portcullis.durationSeconds" -}}
{{- $nanos := dict "ns" 1 "nsec" 1 "nanos" 1 "us" 1000 "usec" 1000 "µs" 1000 "ms" 1000000 "msec" 1000000 "millis" 1000000 "s" 1000000000 "sec" 1000000000 "secs" 1000000000 "second" 1000000000 "seconds" 1000000000 "m" 60000000000 "min" 60000000000 "mins" 60000000000 "minute" 60000000000 "minutes" 60000000000 "h" 3600000000000 "hr" 3600000000000 "hrs" 3600000000000 "hour" 3600000000000 "hours" 3600000000000 "d" 86400000000000 "day" 86400000000000 "days" 86400000000000 "w" 604800000000000 "week" 604800000000000 "weeks" 604800000000000 }}
{{- $compact := regexReplaceAll "\\s+" (toString .) "" }}
{{- $total := 0 }}
{{- $valid := regexMatch "^([0-9]+[a-zµ]+)+$" $compact }}
{{- if $valid }}
{{- range $part := regexFindAll "[0-9]+[a-zµ]+" $compact -1 }}
{{- $unit := regexFind "[a-zµ]+$" $part }}
{{- if hasKey $nanos $unit }}
{{- $count := atoi (regexFind "^[0-9]+" $part) }}
{{- $total = add $total (mul $count (get $nanos $unit)) }}
{{- else }}
{{- $valid = false }}
{{- end }}
{{- end }}
{{- end }}
{{- if $valid }}{{ div (add $total 999999999) 1000000000 }}{{ else }}invalid{{ end }}
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

{{/* The pod-level hardening, shared by the server, the migration Job and the test pod. */}}
{{- define "portcullis.podSecurityContext" -}}
{{- toYaml .Values.podSecurityContext }}
{{- end }}

{{- define "portcullis.containerSecurityContext" -}}
{{- toYaml .Values.securityContext }}
{{- end }}
