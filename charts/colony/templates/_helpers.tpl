{{- define "colony.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "colony.operatorName" -}}
{{- printf "%s-operator" (include "colony.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "colony.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "colony.operatorName" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "colony.selectorLabels" -}}
app.kubernetes.io/name: colony-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "colony.labels" -}}
{{ include "colony.selectorLabels" . }}
app.kubernetes.io/component: operator
app.kubernetes.io/part-of: colony
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{/* Milliseconds of a duration value (the schema allows NNNms, NNs and NNm only). */}}
{{- define "colony.ms" -}}
{{- $n := regexFind "^[0-9]+" . | atoi -}}
{{- if hasSuffix "ms" . -}}{{ $n }}
{{- else if hasSuffix "s" . -}}{{ mul $n 1000 }}
{{- else -}}{{ mul $n 60000 }}
{{- end -}}
{{- end -}}

{{/* Refuses durations that cannot work together. */}}
{{- define "colony.checkDurations" -}}
{{- $lease := include "colony.ms" .Values.nodeLeaseDuration | atoi -}}
{{- $observe := include "colony.ms" .Values.observeInterval | atoi -}}
{{- if lt $lease (mul 3 $observe) -}}
{{- fail (printf "nodeLeaseDuration (%s) must be at least three observeIntervals (%s): a node could be declared failed between two observations" .Values.nodeLeaseDuration .Values.observeInterval) -}}
{{- end -}}
{{- end -}}
