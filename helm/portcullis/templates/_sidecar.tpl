{{/*
portcullis.validatorSidecar: the token validator (`portcullis serve --mode validator`) as a
native sidecar container: an entry for a pod's `initContainers` with `restartPolicy: Always`
(Kubernetes >= 1.29). It starts before the application containers (they wait for its
startup probe, i.e. for it to answer SERVING), runs as long as the pod, and stops after them.
The application calls 127.0.0.1:<port> (ValidateToken, Envoy ext_authz Check, GetJwks).

Use from another chart, with this chart as a dependency (values `portcullis: {mode: none}`:
it then renders nothing itself), or with this file copied into its templates/ (it needs no
other file of this chart):

  initContainers:
    {{- include "portcullis.validatorSidecar" (dict "validator" .Values.portcullisValidator) | nindent 8 }}

Arguments (a dict):
  validator  (required) the map documented under `sidecar.validator` in this chart's
             values.yaml; `image.repository` and `image.tag` (or `image.digest`) are required,
             `centralUrl` or `jwksFile` (exactly one), and `redis.existingSecret`.
  name       container name (default portcullis-validator)

The validator's ops HTTP port (/healthz, /readyz, /metrics, its JWKS) is off unless
`validator.ops.enabled` (then on `validator.ops.port`, 9901 by default, so it does not take
the application's 9090).

Probes: startup (gRPC health: the app containers wait for SERVING) and liveness (TCP). No
readiness probe unless `validator.readinessProbe: true`: a Redis blip would otherwise make
every app pod unready, routes without auth included, while the validator fails closed by
itself after `redis.revocation_max_staleness`.

Nothing else is needed from the including chart: no ConfigMap (configuration is given as
PORTCULLIS_* environment variables), no Service. Except with `validator.centralTls.secretName`
(TLS to an https:// centralUrl): the container then mounts a volume the pod must declare,
with the same arguments:

  volumes:
    {{- include "portcullis.validatorSidecarVolumes" (dict "validator" .Values.portcullisValidator) | nindent 8 }}
*/}}
{{- define "portcullis.validatorSidecar" -}}
{{- $v := .validator | default dict }}
{{- $name := .name | default "portcullis-validator" }}
{{- $image := $v.image | default dict }}
{{- if not $image.repository }}
{{- fail "portcullis.validatorSidecar: validator.image.repository is required (the Portcullis image)" }}
{{- end }}
{{- if not (or $image.tag $image.digest) }}
{{- fail "portcullis.validatorSidecar: validator.image.tag (or image.digest) is required" }}
{{- end }}
{{- $central := $v.centralUrl | default "" }}
{{- $jwksFile := $v.jwksFile | default "" }}
{{- if eq (empty $central) (empty $jwksFile) }}
{{- fail "portcullis.validatorSidecar: set exactly one of validator.centralUrl (the central Portcullis, e.g. http://portcullis.auth.svc.cluster.local:50051) and validator.jwksFile" }}
{{- end }}
{{- $centralTls := $v.centralTls | default dict }}
{{- if and (or $centralTls.secretName $centralTls.serverName) (not (hasPrefix "https://" $central)) }}
{{- fail "portcullis.validatorSidecar: validator.centralTls needs an https:// validator.centralUrl (the central Portcullis serving TLS)" }}
{{- end }}
{{- $tlsDir := "/etc/portcullis/central-tls" }}
{{- $config := deepCopy ($v.config | default dict) }}
{{- if or (hasKey $config "redis_url") (hasKey $config "REDIS_URL") }}
{{- fail "portcullis.validatorSidecar: validator.config.redis_url is refused: the Redis URL (with its password) would be a plain environment value in the pod spec. Name a Secret in validator.redis.existingSecret / validator.redis.key instead" }}
{{- end }}
{{- include "portcullis.intify" $config }}
{{- $redis := $v.redis | default dict }}
{{- if not $redis.existingSecret }}
{{- fail "portcullis.validatorSidecar: validator.redis.existingSecret is required: a Secret with the central instance's Redis URL (revocations)" }}
{{- end }}
{{- $port := int ($v.port | default 50051) }}
{{- $host := $v.listenHost | default "0.0.0.0" }}
{{- $ops := $v.ops | default dict }}
{{- $opsPort := int ($ops.port | default 9901) }}
{{- $hardened := dict "runAsNonRoot" true "runAsUser" 65532 "runAsGroup" 65532 "allowPrivilegeEscalation" false "readOnlyRootFilesystem" true "privileged" false "capabilities" (dict "drop" (list "ALL")) "seccompProfile" (dict "type" "RuntimeDefault") }}
{{- $securityContext := mustMergeOverwrite $hardened (deepCopy ($v.securityContext | default dict)) }}
{{- $resources := $v.resources | default (dict "requests" (dict "cpu" "20m" "memory" "32Mi") "limits" (dict "memory" "64Mi")) -}}
- name: {{ $name }}
  image: {{ ternary (printf "%s@%s" $image.repository $image.digest) (printf "%s:%s" $image.repository (toString $image.tag)) (not (empty $image.digest)) | quote }}
  imagePullPolicy: {{ $image.pullPolicy | default "IfNotPresent" }}
  # A native sidecar: started before the app containers, kept running beside them.
  restartPolicy: Always
  args: ["serve", "--mode", "validator"]
  ports:
    - name: pc-validator
      containerPort: {{ $port }}
      protocol: TCP
    {{- if $ops.enabled }}
    - name: pc-val-ops
      containerPort: {{ $opsPort }}
      protocol: TCP
    {{- end }}
  env:
    - name: PORTCULLIS_SERVER__LISTEN
      value: {{ printf "%s:%d" $host $port | quote }}
    {{- if $ops.enabled }}
    - name: PORTCULLIS_SERVER__OPS_LISTEN
      value: {{ printf "%s:%d" $host $opsPort | quote }}
    {{- else }}
    # No ops HTTP port (it would take 127.0.0.1:9090 in the application's network namespace).
    - name: PORTCULLIS_SERVER__OPS_ENABLED
      value: "false"
    {{- end }}
    - name: PORTCULLIS_REDIS_URL
      valueFrom:
        secretKeyRef:
          name: {{ $redis.existingSecret }}
          key: {{ $redis.key | default "redis-url" | quote }}
    {{- if $central }}
    - name: PORTCULLIS_VALIDATOR__CENTRAL_URL
      value: {{ $central | quote }}
    {{- if $centralTls.secretName }}
    {{- if ne (toString $centralTls.ca) "false" }}
    - name: PORTCULLIS_VALIDATOR__CENTRAL_TLS__CA_FILE
      value: {{ printf "%s/ca.crt" $tlsDir | quote }}
    {{- end }}
    {{- if ne (toString $centralTls.clientCertificate) "false" }}
    - name: PORTCULLIS_VALIDATOR__CENTRAL_TLS__CERT_FILE
      value: {{ printf "%s/tls.crt" $tlsDir | quote }}
    - name: PORTCULLIS_VALIDATOR__CENTRAL_TLS__KEY_FILE
      value: {{ printf "%s/tls.key" $tlsDir | quote }}
    {{- end }}
    {{- end }}
    {{- with $centralTls.serverName }}
    - name: PORTCULLIS_VALIDATOR__CENTRAL_TLS__SERVER_NAME
      value: {{ . | quote }}
    {{- end }}
    {{- else }}
    - name: PORTCULLIS_VALIDATOR__JWKS_FILE
      value: {{ $jwksFile | quote }}
    {{- end }}
    {{- with include "portcullis.flattenEnv" (dict "prefix" "PORTCULLIS_" "map" $config) | trim }}
    {{- . | nindent 4 }}
    {{- end }}
    {{- with $v.env }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  # kubelet's gRPC probes (grpc.health.v1, service ""): SERVING once the keys are loaded and
  # while Redis answers. The app containers start only after the startup probe passed.
  startupProbe:
    grpc:
      port: {{ $port }}
    periodSeconds: 1
    timeoutSeconds: 2
    failureThreshold: 60
  {{- /*
  Readiness is opt-in (validator.readinessProbe: true): it would take every app pod out of
  its Services during a Redis blip, routes that need no token included, while the validator
  already fails closed on its own after redis.revocation_max_staleness.
  */}}
  {{- if eq (toString $v.readinessProbe) "true" }}
  readinessProbe:
    grpc:
      port: {{ $port }}
    periodSeconds: 5
    timeoutSeconds: 2
    failureThreshold: 2
  {{- end }}
  # Liveness is the process accepting connections, not health: a Redis outage must not
  # restart the sidecar (it fails closed on its own).
  livenessProbe:
    tcpSocket:
      port: {{ $port }}
    periodSeconds: 10
    timeoutSeconds: 2
    failureThreshold: 3
  resources:
    {{- toYaml $resources | nindent 4 }}
  securityContext:
    {{- toYaml $securityContext | nindent 4 }}
  {{- if or $v.volumeMounts $centralTls.secretName }}
  volumeMounts:
    {{- with $v.volumeMounts }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
    {{- if $centralTls.secretName }}
    # The whole Secret (never subPath, which would freeze the files): renewals are read at
    # the next key fetch.
    - name: {{ printf "%s-central-tls" $name }}
      mountPath: {{ $tlsDir }}
      readOnly: true
    {{- end }}
  {{- end }}
{{- end }}

{{/*
portcullis.validatorSidecarVolumes: the pod volumes the validator sidecar mounts (same
arguments as portcullis.validatorSidecar); nothing unless `validator.centralTls.secretName`.
Mode 0444: the including pod's fsGroup is unknown, and the volume is mounted only in the
validator's container.
*/}}
{{- define "portcullis.validatorSidecarVolumes" -}}
{{- $v := .validator | default dict }}
{{- $name := .name | default "portcullis-validator" }}
{{- $centralTls := $v.centralTls | default dict }}
{{- if $centralTls.secretName }}
- name: {{ printf "%s-central-tls" $name }}
  secret:
    secretName: {{ $centralTls.secretName }}
    defaultMode: 0444
{{- end }}
{{- end }}

{{/*
portcullis.intify: replaces, in place, whole float64 numbers of a map (and of its maps and
lists) by int64. Helm reads every number of values.yaml as a float: without this, 2 would be
written 2.0 (TOML) and 1000000 "1e+06" (environment), which integer settings refuse. Used
by the ConfigMap (_helpers.tpl) and the sidecar's environment; defined here so that this
file stays self-contained.
*/}}
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

{{/*
A configuration map as PORTCULLIS_* environment entries (nested keys joined with "__"):
{tokens: {issuer: x}} -> PORTCULLIS_TOKENS__ISSUER=x. Lists become [a, b].
Call with (dict "prefix" "PORTCULLIS_" "map" $map).
*/}}
{{- define "portcullis.flattenEnv" -}}
{{- $prefix := .prefix }}
{{- range $k, $v := .map }}
{{- $key := printf "%s%s" $prefix (upper $k) }}
{{- if kindIs "map" $v }}
{{- include "portcullis.flattenEnv" (dict "prefix" (printf "%s__" $key) "map" $v) }}
{{- else if kindIs "slice" $v }}
{{- $items := list }}
{{- range $v }}{{ $items = append $items (toString .) }}{{ end }}
- name: {{ $key }}
  value: {{ printf "[%s]" (join ", " $items) | quote }}
{{- else }}
- name: {{ $key }}
  value: {{ toString $v | quote }}
{{- end }}
{{- end }}
{{- end }}
